"""Weight path: per-sample low-rank deltas on the LLM's target modules.

Each target module (nn.Linear, or GPT-2's transposed Conv1D) is replaced by a ``LowRankWrapper`` that computes
``y = base(x) + scale · (x Aᵀ) Bᵀ`` for every sample of the batch with batched matmuls (Triton on CUDA), using the
``WeightContext`` active for the current call. The context lives in a ``contextvars.ContextVar``: it is set for
one forward/generate call by ``use_weight_context`` and always restored, so two threads (or asyncio tasks) never
see each other's video. ``merge``/``unmerge`` fold one video's delta into the base weights for the batch-of-one
fast path; the original weights are kept and copied back bit-exactly.
"""

from __future__ import annotations

import contextvars
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..kernels import lowrank_delta
from ..methods.base import WeightContext
from ..targets import TargetSite

_ACTIVE: contextvars.ContextVar[WeightContext | None] = contextvars.ContextVar("video2param_weight_context", default=None)


def site_key(site: TargetSite) -> str:
    """Stable name of a target site: the module name, plus the part for a fused projection's slice."""
    return site.key


def active_context() -> WeightContext | None:
    """The weight context of the current call (None outside a video call)."""
    return _ACTIVE.get()


@contextmanager
def use_weight_context(context: WeightContext | None) -> Iterator[None]:
    """Make ``context`` the active video for the calls made inside the block (restored on exit, also on error)."""
    token = _ACTIVE.set(context)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


class LowRankWrapper(nn.Module):
    """Wraps one Linear/Conv1D; adds the active context's delta for each of its target parts."""

    def __init__(self, base: nn.Module, sites: list[TargetSite]) -> None:
        super().__init__()
        self.base = base
        self.transposed = sites[0].transposed
        self.keys = [site_key(s) for s in sites]
        for i, site in enumerate(sites):
            index = site.out_index() if site.is_fused else None
            # Buffers follow .to(device); non-persistent so they never enter a state dict.
            self.register_buffer(f"_index{i}", index, persistent=False)
        self._saved_weight: torch.Tensor | None = None
        self.merged_context: WeightContext | None = None

    def _index(self, i: int) -> torch.Tensor | None:
        return getattr(self, f"_index{i}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        context = _ACTIVE.get()
        if self.merged_context is not None:
            if context is not self.merged_context:
                raise RuntimeError(
                    "video2param: this model's weights hold a merged video; it can only be called inside that "
                    "video's `merged(...)` block (unmerge first to run other inputs)"
                )
            return out
        if context is None:
            return out
        for i, key in enumerate(self.keys):
            factors = context.deltas.get(key)
            if factors is None:
                continue
            delta = _batched_delta(x, factors.A.to(x.dtype), factors.B.to(x.dtype), factors.scale)
            index = self._index(i)
            out = out + delta if index is None else out.index_add(-1, index, delta)
        return out

    # ---- merged fast path -------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, context: WeightContext, sample: int = 0) -> None:
        """Add one sample's delta into the base weight (the original is kept for an exact unmerge)."""
        if self.merged_context is not None:
            raise RuntimeError("video2param: a video is already merged into this module; unmerge it first")
        weight = self.base.weight
        self._saved_weight = weight.detach().clone()
        try:
            for i, key in enumerate(self.keys):
                factors = context.deltas.get(key)
                if factors is None:
                    continue
                delta = factors.delta_weight(sample).to(weight.dtype)  # (d_out_part, d_in)
                index = self._index(i)
                if self.transposed:  # Conv1D stores (d_in, d_out)
                    if index is None:
                        weight.add_(delta.T)
                    else:
                        weight.index_add_(1, index, delta.T)
                elif index is None:
                    weight.add_(delta)
                else:
                    weight.index_add_(0, index, delta)
        except BaseException:
            weight.copy_(self._saved_weight)
            self._saved_weight = None
            raise
        self.merged_context = context

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the original weight bit-exactly."""
        if self._saved_weight is not None:
            self.base.weight.copy_(self._saved_weight)
        self._saved_weight = None
        self.merged_context = None


def _batched_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-sample delta for x of shape (n, L, d_in), or (n·L, d_in) as some models (OPT's MLP) flatten it."""
    n = A.shape[0]
    if x.dim() == 3:
        if x.shape[0] != n:
            if n != 1:
                raise ValueError(f"video2param: the video context holds {n} videos but the input batch has {x.shape[0]} rows")
            A = A.expand(x.shape[0], -1, -1)
        return lowrank_delta(x, A, B, scale)
    if x.dim() == 2:
        if x.shape[0] % n:
            raise ValueError(f"video2param: {x.shape[0]} flattened tokens cannot be split evenly over {n} videos")
        # Row-major flattening of (n, L, d) keeps each sample's tokens contiguous.
        return lowrank_delta(x.reshape(n, -1, x.shape[-1]), A, B, scale).reshape(x.shape[0], -1)
    raise ValueError(f"video2param: unsupported input of shape {tuple(x.shape)} for a low-rank target")


def inject_lowrank(model: nn.Module, sites: list[TargetSite]) -> dict[str, LowRankWrapper]:
    """Replace every module named by ``sites`` with a ``LowRankWrapper``; returns {module name: wrapper}."""
    by_module: dict[str, list[TargetSite]] = defaultdict(list)
    for site in sites:
        by_module[site.name].append(site)
    wrappers: dict[str, LowRankWrapper] = {}
    for name, module_sites in by_module.items():
        module = model.get_submodule(name)
        if isinstance(module, LowRankWrapper):
            raise RuntimeError(f"video2param: {name} is already wrapped (was the model wrapped twice?)")
        wrapper = LowRankWrapper(module, module_sites)
        _set_submodule(model, name, wrapper)
        wrappers[name] = wrapper
    return wrappers


def remove_lowrank(model: nn.Module, wrappers: dict[str, LowRankWrapper]) -> None:
    """Put the original modules back (unmerging first), leaving the model as it was before ``inject_lowrank``."""
    for name, wrapper in wrappers.items():
        wrapper.unmerge()
        _set_submodule(model, name, wrapper.base)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
