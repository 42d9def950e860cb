"""Weight path: per-sample low-rank deltas on the LLM's target modules.

Each target module (nn.Linear, or GPT-2's transposed Conv1D) is replaced by a ``LowRankWrapper`` that computes
``y = base(x) + scale · (x Aᵀ) Bᵀ`` for every sample of the batch with batched matmuls (Triton on CUDA), using the
``WeightContext`` active for the current call. The context lives in a ``contextvars.ContextVar`` that maps an
``InjectionScope`` (one per ``VideoModel``) to its video: it is set for one forward/generate call by
``use_weight_context`` and always restored, so two threads (or asyncio tasks) never see each other's video, and a
video activated for one model never reaches another model's wrappers. Gradient checkpointing recomputes layers
outside that call: ``carry_context_through_checkpointing`` makes the LLM's checkpoint function pass the active
deltas into the checkpointed region as explicit inputs (so recomputation sees the same video, and gradients reach
the video method with reentrant checkpointing too). ``merge``/``unmerge`` fold one video's delta into the base
weights for the batch-of-one fast path; the original weights are kept and copied back bit-exactly.
"""

from __future__ import annotations

import contextvars
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from ..kernels import lowrank_delta
from ..methods.base import LowRank, WeightContext
from ..targets import TargetSite

class InjectionScope:
    """Identity of one model's set of wrappers: the key under which its active video is found."""

    __slots__ = ("__weakref__",)


ActiveContexts = Mapping[InjectionScope, WeightContext]
_ACTIVE: contextvars.ContextVar[ActiveContexts] = contextvars.ContextVar("video2param_weight_contexts", default={})


def site_key(site: TargetSite) -> str:
    """Stable name of a target site: the module name, plus the part for a fused projection's slice."""
    return site.key


def active_context(scope: InjectionScope) -> WeightContext | None:
    """The weight context active for ``scope`` in the current call (None outside a video call)."""
    return _ACTIVE.get().get(scope)


@contextmanager
def use_weight_context(scope: InjectionScope, context: WeightContext | None) -> Iterator[None]:
    """Make ``context`` the active video of ``scope`` inside the block (restored on exit, also on error).

    ``None`` switches the scope's deltas off (e.g. to read the plain LLM inside a video call).
    """
    active = dict(_ACTIVE.get())
    if context is None:
        active.pop(scope, None)
    else:
        active[scope] = context
    token = _ACTIVE.set(active)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def replace_active_context(scope: InjectionScope, context: WeightContext) -> None:
    """Swap the scope's active context for the rest of the enclosing ``use_weight_context`` block."""
    _ACTIVE.set({**_ACTIVE.get(), scope: context})


# ---- gradient checkpointing ----------------------------------------------------------------------------------
class _ContextCarryingCheckpoint:
    """Wraps an LLM's checkpoint function so the active deltas enter the checkpointed region as inputs.

    Without it, the recomputation in backward runs outside the ``ContextVar`` scope of the call: non-reentrant
    checkpointing then fails its recompute check, and reentrant checkpointing silently drops the deltas' gradients.
    Only tensors that require grad are passed as inputs; everything else is captured as is.
    """

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, function, *args, **kwargs):
        active = _ACTIVE.get()
        slots = [(scope, key, part) for scope, ctx in active.items() for key, lr in ctx.deltas.items()
                 for part in ("A", "B") if getattr(lr, part).requires_grad]
        if not slots:
            return self.inner(_with_active(function, active), *args, **kwargs)
        tensors = [getattr(active[scope].deltas[key], part) for scope, key, part in slots]
        n_args = len(args)

        def run(*all_args):
            rebuilt = {scope: WeightContext(dict(ctx.deltas)) for scope, ctx in active.items()}
            for (scope, key, part), tensor in zip(slots, all_args[n_args:]):
                old = rebuilt[scope].deltas[key]
                A, B = (tensor, old.B) if part == "A" else (old.A, tensor)
                rebuilt[scope].deltas[key] = LowRank(A, B, old.scale)
            token = _ACTIVE.set(rebuilt)
            try:
                return function(*all_args[:n_args])
            finally:
                _ACTIVE.reset(token)

        return self.inner(run, *args, *tensors, **kwargs)


def _with_active(function, active: ActiveContexts):
    def run(*args, **kwargs):
        token = _ACTIVE.set(active)
        try:
            return function(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    return run


def carry_context_through_checkpointing(model: nn.Module) -> None:
    """Wrap every checkpoint function the HF model installed (``gradient_checkpointing_enable``), once each.

    HF checkpoints only in training mode with gradients on, so inference calls skip the walk over the modules.
    """
    if not (model.training and torch.is_grad_enabled()):
        return
    for module in model.modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if func is not None and not isinstance(func, _ContextCarryingCheckpoint):
            module._gradient_checkpointing_func = _ContextCarryingCheckpoint(func)


class LowRankWrapper(nn.Module):
    """Wraps one Linear/Conv1D; adds the active context's delta for each of its target parts."""

    def __init__(self, base: nn.Module, sites: list[TargetSite], scope: InjectionScope) -> None:
        super().__init__()
        self.base = base
        self.scope = scope
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
        context = _ACTIVE.get().get(self.scope)
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
        _check_mergeable(weight, context, self.keys, self.transposed)
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


def _check_mergeable(weight: torch.Tensor, context: WeightContext, keys: list[str], transposed: bool) -> None:
    """ValueError when a delta cannot be added into ``weight`` as a dense float matrix: quantized (integer or
    packed storage: the cast would corrupt it), sharded (DeepSpeed ZeRO-3 partitions, DTensor) or not the shape
    the delta describes. The unmerged path serves such models."""
    hint = "; use the unmerged path (generate(..., merge=False), or drop merged())"
    if getattr(weight, "ds_id", None) is not None or type(weight).__name__ == "DTensor":
        raise ValueError(f"merged(): the base weight is sharded ({type(weight).__name__}, DeepSpeed ZeRO-3 or FSDP); "
                         f"a video cannot be merged into one shard{hint}")
    if not weight.is_floating_point():
        raise ValueError(f"merged(): the base weight is stored as {weight.dtype} (a quantized layer?); adding a delta "
                         f"would corrupt it{hint}")
    shape = tuple(weight.shape)
    rows, cols = (shape[::-1] if transposed else shape) if len(shape) == 2 else (-1, -1)
    for key in keys:
        factors = context.deltas.get(key)
        if factors is None:
            continue
        d_out, d_in = factors.B.shape[1], factors.A.shape[2]
        if cols != d_in or rows < d_out:
            raise ValueError(f"merged(): the base weight of {key!r} has shape {tuple(weight.shape)}, not the "
                             f"({d_out}, {d_in}) matrix its delta describes{hint}")


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


def inject_lowrank(model: nn.Module, sites: list[TargetSite], scope: InjectionScope) -> dict[str, LowRankWrapper]:
    """Replace every module named by ``sites`` with a ``LowRankWrapper`` reading ``scope``'s video.

    Returns {module name: wrapper}.
    """
    by_module: dict[str, list[TargetSite]] = defaultdict(list)
    for site in sites:
        by_module[site.name].append(site)
    wrappers: dict[str, LowRankWrapper] = {}
    for name, module_sites in by_module.items():
        module = model.get_submodule(name)
        if isinstance(module, LowRankWrapper):
            raise RuntimeError(f"video2param: {name} is already wrapped (was the model wrapped twice?)")
        wrapper = LowRankWrapper(module, module_sites, scope)
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
