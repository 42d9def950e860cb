"""Prompt-guided 3D weighted pooling (PPLLaVA): window sums of ``S · V`` over (T, H, W).

``V`` is ``(B, T, H, W, C)`` channels-last, ``S`` is ``(B, T, H, W)``. For each output position
``o`` with window ``W(o)`` (``kernel`` wide, ``stride`` apart, no padding)::

    mode="sum":            out[o] = Σ_{p ∈ W(o)} S[p] · V[p]
    mode="window_softmax": out[o] = Σ_{p ∈ W(o)} softmax_{W(o)}(S / temperature)[p] · V[p]

Layout of this file: input checking shared by both paths, :func:`weighted_pool3d_reference` (the
specification) and the dispatching :func:`weighted_pool3d`. The Triton kernels, their launchers and
the ``autograd.Function`` live in :mod:`._pool3d_triton`, imported only when a call goes to Triton.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product

import torch

from ._dispatch import kernel_backend

__all__ = ["MODES", "weighted_pool3d", "weighted_pool3d_reference"]

#: Pooling modes; ``"sum"`` is the default (PPLLaVA's paper formula), ``"window_softmax"`` is the
#: public code's per-window temperature softmax re-normalisation of ``S``.
MODES = ("sum", "window_softmax")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------------
# Input checking
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pool:
    kernel: tuple[int, int, int]
    stride: tuple[int, int, int]
    out_thw: tuple[int, int, int]
    softmax: bool
    temperature: float


def _triple(name: str, value: object) -> tuple[int, int, int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise ValueError(f"{name} must be a 3-tuple (t, h, w) of positive ints, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a 3-tuple (t, h, w) of positive ints, got {value!r}")
        out.append(v)
    return out[0], out[1], out[2]


def _check_inputs(
    V: torch.Tensor,
    S: torch.Tensor,
    kernel: Sequence[int],
    stride: Sequence[int] | None,
    mode: str,
    temperature: float,
) -> _Pool:
    if not isinstance(V, torch.Tensor) or V.dim() != 5:
        raise ValueError(f"V must be a (B, T, H, W, C) tensor, got {getattr(V, 'shape', type(V).__name__)}")
    if not isinstance(S, torch.Tensor) or S.dim() != 4:
        raise ValueError(f"S must be a (B, T, H, W) tensor, got {getattr(S, 'shape', type(S).__name__)}")
    if V.dtype not in _DTYPES:
        raise ValueError(f"V must be float16, bfloat16, float32 or float64, got {V.dtype}")
    if S.dtype not in _DTYPES:
        raise ValueError(f"S must be float16, bfloat16, float32 or float64, got {S.dtype}")
    if tuple(S.shape) != tuple(V.shape[:4]):
        raise ValueError(f"S shape {tuple(S.shape)} must equal V's (B, T, H, W) = {tuple(V.shape[:4])}")
    if S.device != V.device:
        raise ValueError(f"S is on {S.device} but V is on {V.device}")
    k = _triple("kernel", kernel)
    s = k if stride is None else _triple("stride", stride)
    thw = tuple(V.shape[1:4])
    if any(ki > n for ki, n in zip(k, thw)):
        raise ValueError(f"kernel {k} is larger than the input's (T, H, W) = {thw}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(temperature, torch.Tensor):
        temperature = float(temperature.item())
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a positive float, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite float, got {temperature}")
    out_thw = tuple((n - ki) // si + 1 for n, ki, si in zip(thw, k, s))
    return _Pool(k, s, out_thw, mode == "window_softmax", float(temperature))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# PyTorch reference (the specification)
# --------------------------------------------------------------------------------------------------


def _reference(V: torch.Tensor, S: torch.Tensor, p: _Pool) -> torch.Tensor:
    acc_dtype = torch.promote_types(torch.promote_types(V.dtype, S.dtype), torch.float32)
    Vf, Sf = V.to(acc_dtype), S.to(acc_dtype)
    (st, sh, sw), (To, Ho, Wo) = p.stride, p.out_thw

    def window(t: torch.Tensor, i: int, j: int, l: int) -> torch.Tensor:
        # Element (i, j, l) of every window at once: a strided slice, no unfold copy of V.
        return t[:, i : i + st * (To - 1) + 1 : st, j : j + sh * (Ho - 1) + 1 : sh, l : l + sw * (Wo - 1) + 1 : sw]

    offsets = list(product(*(range(k) for k in p.kernel)))
    if p.softmax:
        logits = torch.stack([window(Sf, *o) for o in offsets], dim=-1) / p.temperature
        weights = torch.softmax(logits, dim=-1).unbind(-1)
    else:
        weights = tuple(window(Sf, *o) for o in offsets)
    out = sum(w.unsqueeze(-1) * window(Vf, *o) for w, o in zip(weights, offsets))
    return out.to(V.dtype)  # type: ignore[union-attr]


def weighted_pool3d_reference(
    V: torch.Tensor,
    S: torch.Tensor,
    kernel: Sequence[int],
    stride: Sequence[int] | None = None,
    mode: str = "sum",
    temperature: float = 1.0,
) -> torch.Tensor:
    """PyTorch specification of :func:`weighted_pool3d` (same arguments, same checks).

    Computes in float32 (float64 when either input is float64) and casts once to ``V.dtype``.
    Differentiable by autograd.
    """
    return _reference(V, S, _check_inputs(V, S, kernel, stride, mode, temperature))


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def weighted_pool3d(
    V: torch.Tensor,
    S: torch.Tensor,
    kernel: Sequence[int],
    stride: Sequence[int] | None = None,
    mode: str = "sum",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Weighted 3D pooling of channels-last video features by per-position scores.

    Args:
        V: ``(B, T, H, W, C)`` features, float16/bfloat16/float32/float64.
        S: ``(B, T, H, W)`` scores (any of those float dtypes; math runs in float32 or wider).
        kernel: window ``(k_t, k_h, k_w)``; must fit inside ``(T, H, W)``.
        stride: step ``(s_t, s_h, s_w)``; defaults to ``kernel``. ``kernel > stride`` overlaps windows.
        mode: ``"sum"`` (default) weights by ``S`` as given; ``"window_softmax"`` weights by
            ``softmax(S / temperature)`` taken inside each window.
        temperature: softmax temperature (``"window_softmax"`` only), positive.

    Returns:
        ``(B, T', H', W', C)`` in ``V.dtype`` with ``T' = (T - k_t) // s_t + 1`` (likewise H', W').
        Differentiable w.r.t. ``V`` and ``S``; the Triton backward is deterministic.
    """
    pool = _check_inputs(V, S, kernel, stride, mode, temperature)
    if kernel_backend(V, S) == "torch" or V.numel() == 0:
        return _reference(V, S, pool)
    from ._pool3d_triton import WeightedPool3dFunction  # imports Triton: only on this path

    return WeightedPool3dFunction.apply(V, S, pool)
