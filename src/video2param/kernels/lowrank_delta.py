"""Per-sample low-rank delta: ``out = base_out + scale · (x Aᵢᵀ) Bᵢᵀ`` for the tokens of sample ``i``.

Layout: input checking shared by both paths, :func:`lowrank_delta_reference` (the PyTorch
specification: fp32 math, one cast at the end) and the dispatching :func:`lowrank_delta`. The Triton
kernels, their launchers and the ``autograd.Function`` live in :mod:`._lowrank_triton`, imported only
when a call goes to Triton.

Tokens of one sample are contiguous: either ``x`` is ``(n, L, d_in)`` or ``x`` is packed
``(total, d_in)`` with ``segments`` offsets. No factor is ever repeated per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._dispatch import backend_mode, kernel_backend

__all__ = ["MAX_TRITON_RANK", "lowrank_delta", "lowrank_delta_reference"]

#: Largest rank the Triton kernel accepts: the fp32 ``BLOCK_M × r`` tile must fit in registers.
MAX_TRITON_RANK = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------------
# Input checking (shared by both paths, so both reject exactly the same inputs)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Normalised view of the inputs: ``x`` as ``(total, d_in)`` plus how tokens map to samples."""

    x2: torch.Tensor
    base2: torch.Tensor | None
    segments: torch.Tensor | None  # n+1 offsets, or None when every sample has ``tokens`` tokens
    tokens: int  # tokens per sample in the uniform case (unused with segments)
    n: int
    rank: int
    d_in: int
    d_out: int
    scale: float
    out_shape: tuple[int, ...]


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _as_scale(scale: float | torch.Tensor) -> float:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or scale.dim() != 0:
            raise ValueError(f"scale must be a python float or a 0-d tensor, got shape {tuple(scale.shape)}")
        if scale.requires_grad:
            raise ValueError("scale must not require grad: lowrank_delta gives no gradient to scale")
        return float(scale.item())
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a python float or a 0-d tensor, got {type(scale).__name__}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _check_inputs(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float | torch.Tensor,
    base_out: torch.Tensor | None,
    segments: torch.Tensor | None,
) -> _Layout:
    x = _check_tensor("x", x)
    A = _check_tensor("A", A)
    B = _check_tensor("B", B)
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be (n, L, d_in) or packed (total_tokens, d_in), got shape {tuple(x.shape)}")
    if A.dim() != 3:
        raise ValueError(f"A must be (n, r, d_in), got shape {tuple(A.shape)}")
    if B.dim() != 3:
        raise ValueError(f"B must be (n, d_out, r) or (1, d_out, r), got shape {tuple(B.shape)}")
    n, rank, d_in = A.shape
    d_out = B.shape[1]
    if rank < 1 or d_in < 1 or d_out < 1:
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} must have non-zero rank and widths")
    if x.shape[-1] != d_in:
        raise ValueError(f"x has d_in={x.shape[-1]} but A expects d_in={d_in} (A shape {tuple(A.shape)})")
    if B.shape[2] != rank:
        raise ValueError(f"B has rank {B.shape[2]} but A has rank {rank}")
    if B.shape[0] not in (1, n):
        raise ValueError(f"B must have {n} samples (one per A) or 1 (shared), got {B.shape[0]}")
    for name, t in (("A", A), ("B", B)):
        if t.dtype != x.dtype:
            raise ValueError(f"{name} dtype {t.dtype} does not match x dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")

    if x.dim() == 3:
        if segments is not None:
            raise ValueError("segments is only valid with packed 2-D x; 3-D x already gives one row per sample")
        if x.shape[0] != n:
            raise ValueError(f"x has {x.shape[0]} samples but A has {n}")
        tokens = x.shape[1]
        x2 = x.reshape(n * tokens, d_in)
    else:
        x2 = x
        tokens = x.shape[0]
        if segments is None:
            if n != 1:
                raise ValueError(f"2-D x needs segments (n+1 offsets) when there are {n} samples")
        else:
            segments = _check_segments(segments, n, x)

    out_shape = (*x.shape[:-1], d_out)
    base2 = None
    if base_out is not None:
        base_out = _check_tensor("base_out", base_out)
        if tuple(base_out.shape) != out_shape:
            raise ValueError(f"base_out must have shape {out_shape}, got {tuple(base_out.shape)}")
        if base_out.dtype != x.dtype:
            raise ValueError(f"base_out dtype {base_out.dtype} does not match x dtype {x.dtype}")
        if base_out.device != x.device:
            raise ValueError(f"base_out is on {base_out.device} but x is on {x.device}")
        base2 = base_out.reshape(x2.shape[0], d_out)
    return _Layout(x2, base2, segments, tokens, n, rank, d_in, d_out, _as_scale(scale), out_shape)


def _check_segments(segments: object, n: int, x: torch.Tensor) -> torch.Tensor:
    seg = _check_tensor("segments", segments)
    if seg.dim() != 1 or seg.shape[0] != n + 1:
        raise ValueError(f"segments must be 1-D with n+1={n + 1} offsets, got shape {tuple(seg.shape)}")
    if seg.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"segments must be an int64 tensor, got {seg.dtype}")
    if seg.device != x.device:
        raise ValueError(f"segments is on {seg.device} but x is on {x.device}")
    if seg.device.type == "cpu":
        # Checking values on CUDA would cost a host sync per call; the Triton launcher clamps
        # offsets instead, so bad CUDA offsets give wrong numbers, never out-of-bounds accesses.
        if int(seg[0]) != 0 or int(seg[-1]) != x.shape[0]:
            raise ValueError(f"segments must start at 0 and end at total_tokens={x.shape[0]}, got {seg.tolist()}")
        if bool((seg[1:] < seg[:-1]).any()):
            raise ValueError(f"segments must be non-decreasing, got {seg.tolist()}")
    return seg.to(torch.int64)


# --------------------------------------------------------------------------------------------------
# PyTorch reference (the specification)
# --------------------------------------------------------------------------------------------------


def _reference(lay: _Layout, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    acc_dtype = torch.promote_types(lay.x2.dtype, torch.float32)
    Af, Bf = A.to(acc_dtype), B.to(acc_dtype)
    xf = lay.x2.to(acc_dtype)
    if lay.segments is None:
        x3 = xf.reshape(lay.n, lay.tokens, lay.d_in)
        shrunk = torch.bmm(x3, Af.transpose(1, 2))  # (n, L, r): the fp32 shrink
        expand = Bf.expand(lay.n, -1, -1) if Bf.shape[0] == 1 else Bf
        delta = torch.bmm(shrunk, expand.transpose(1, 2)).reshape(-1, lay.d_out)
    else:
        bounds = lay.segments.tolist()
        parts = []
        for i in range(lay.n):
            rows = xf[bounds[i] : bounds[i + 1]]
            b_i = Bf[0] if Bf.shape[0] == 1 else Bf[i]
            parts.append((rows @ Af[i].T) @ b_i.T)
        delta = torch.cat(parts, 0) if parts else xf.new_zeros(0, lay.d_out)
    out = delta * lay.scale
    if lay.base2 is not None:
        out = out + lay.base2.to(acc_dtype)
    return out.to(lay.x2.dtype).reshape(lay.out_shape)


def lowrank_delta_reference(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float | torch.Tensor,
    base_out: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch specification of :func:`lowrank_delta` (same arguments, same checks).

    Computes in float32 (float64 for float64 inputs) — shrink ``x Aᵢᵀ``, expand ``· Bᵢᵀ``, times
    ``scale``, plus ``base_out`` — and casts once to ``x.dtype``. Differentiable by autograd.
    """
    lay = _check_inputs(x, A, B, scale, base_out, segments)
    return _reference(lay, A, B)


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def lowrank_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float | torch.Tensor,
    base_out: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample low-rank update ``base_out + scale · (x Aᵢᵀ) Bᵢᵀ``, fused on CUDA.

    Args:
        x: ``(n, L, d_in)`` — sample ``i`` owns ``x[i]`` — or packed ``(total_tokens, d_in)`` with
            ``segments``; 2-D ``x`` without ``segments`` requires ``n == 1``.
        A: ``(n, r, d_in)`` per-sample down projection.
        B: ``(n, d_out, r)`` per-sample, or ``(1, d_out, r)`` shared by all samples.
        scale: python float or 0-d tensor (no gradient flows to it).
        base_out: optional ``x.shape[:-1] + (d_out,)`` tensor added to the delta; never modified in place.
        segments: 1-D int64 tensor of ``n + 1`` offsets for packed ``x``: sample ``i`` owns rows
            ``segments[i]:segments[i+1]``.

    Returns:
        ``x.shape[:-1] + (d_out,)`` in ``x.dtype``. Differentiable w.r.t. ``x``, ``A``, ``B`` and
        ``base_out``. All tensors must share ``x``'s dtype and device (``ValueError`` otherwise).

    Dispatch: Triton when every tensor is on CUDA (or ``VIDEO2PARAM_KERNELS=triton``), else
    :func:`lowrank_delta_reference`; see :func:`video2param.kernels.kernel_backend`.
    """
    lay = _check_inputs(x, A, B, scale, base_out, segments)
    if kernel_backend(lay.x2, A, B, lay.base2, lay.segments) == "torch" or lay.x2.shape[0] == 0:
        return _reference(lay, A, B)
    if lay.rank > MAX_TRITON_RANK and backend_mode() != "triton":
        return _reference(lay, A, B)  # auto: ranks beyond the kernel's register budget use torch
    from ._lowrank_triton import LowRankDeltaFunction, Tokens  # imports Triton: only on this path

    seg = None
    if lay.segments is not None:
        seg = lay.segments.clamp(0, lay.x2.shape[0]).contiguous()  # never index outside x
    tok = Tokens(lay.x2.shape[0], lay.n, seg, lay.tokens)
    out = LowRankDeltaFunction.apply(lay.x2, A, B, lay.base2, lay.scale, tok)
    return out.reshape(lay.out_shape)
