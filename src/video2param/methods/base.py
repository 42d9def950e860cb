"""The method protocol, the two kinds of video context, and the method registry.

A method turns video features (B, T, P, Dv) into a ``VideoContext``:
- ``TokenContext``: embeddings (B, N, D) spliced into the prompt at the video placeholder (token path);
- ``WeightContext``: per-sample low-rank factors for target modules of the LLM (weight path).
A method never touches the LLM itself; ``VideoModel`` routes the context to the right injection path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from ..config import VideoAdapterConfig
    from ..targets import TargetSite


class VideoContext:
    """What a method produces for a batch of videos; reusable across prompts ("encode once, ask many")."""

    batch_size: int

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "VideoContext":
        raise NotImplementedError

    def select(self, index: torch.Tensor | list[int]) -> "VideoContext":
        """The context of a subset (or a repetition) of the batch's videos."""
        raise NotImplementedError


@dataclass
class TokenContext(VideoContext):
    """Video as N input embeddings per sample. ``mask[b, n]`` is False for padding positions (short videos)."""

    embeds: torch.Tensor  # (B, N, D)
    mask: torch.Tensor | None = None  # (B, N) bool

    def __post_init__(self) -> None:
        if self.embeds.dim() != 3:
            raise ValueError(f"TokenContext.embeds: expected (B, N, D), got shape {tuple(self.embeds.shape)}")
        if self.mask is not None and self.mask.shape != self.embeds.shape[:2]:
            raise ValueError(
                f"TokenContext.mask: expected shape {tuple(self.embeds.shape[:2])}, got {tuple(self.mask.shape)}"
            )

    @property
    def batch_size(self) -> int:  # type: ignore[override]
        return self.embeds.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.embeds.shape[1]

    def to(self, device=None, dtype=None) -> "TokenContext":
        mask = None if self.mask is None else self.mask.to(device)
        return TokenContext(self.embeds.to(device=device, dtype=dtype), mask)

    def select(self, index) -> "TokenContext":
        index = torch.as_tensor(index, device=self.embeds.device)
        mask = None if self.mask is None else self.mask[index]
        return TokenContext(self.embeds[index], mask)


@dataclass
class LowRank:
    """Low-rank factors of one target: delta(x) = scale * (x Aᵀ) Bᵀ.

    A: (n, r, d_in), one per sample. B: (n, d_out, r) per sample, or (1, d_out, r) shared by the batch.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    def __post_init__(self) -> None:
        if self.A.dim() != 3 or self.B.dim() != 3:
            raise ValueError(f"LowRank: A and B must be 3-D, got {tuple(self.A.shape)} and {tuple(self.B.shape)}")
        if self.A.shape[1] != self.B.shape[2]:
            raise ValueError(f"LowRank: rank of A ({self.A.shape[1]}) != rank of B ({self.B.shape[2]})")
        if self.B.shape[0] not in (1, self.A.shape[0]):
            raise ValueError(f"LowRank: B batch {self.B.shape[0]} must be 1 or A's batch {self.A.shape[0]}")

    @property
    def batch_size(self) -> int:
        return self.A.shape[0]

    def to(self, device=None, dtype=None) -> "LowRank":
        return LowRank(self.A.to(device=device, dtype=dtype), self.B.to(device=device, dtype=dtype), self.scale)

    def select(self, index: torch.Tensor) -> "LowRank":
        B = self.B if self.B.shape[0] == 1 else self.B[index]
        return LowRank(self.A[index], B, self.scale)

    def delta_weight(self, sample: int = 0) -> torch.Tensor:
        """The dense (d_out, d_in) delta of one sample: scale * B A (used to merge or export)."""
        B = self.B[0 if self.B.shape[0] == 1 else sample]
        return self.scale * (B.float() @ self.A[sample].float())


@dataclass
class WeightContext(VideoContext):
    """Video as low-rank deltas, keyed by target key (see ``inject.lowrank.site_key``)."""

    deltas: dict[str, LowRank]

    def __post_init__(self) -> None:
        if not self.deltas:
            raise ValueError("WeightContext: no deltas")
        sizes = {d.batch_size for d in self.deltas.values()}
        if len(sizes) != 1:
            raise ValueError(f"WeightContext: deltas disagree on the batch size: {sorted(sizes)}")

    @property
    def batch_size(self) -> int:  # type: ignore[override]
        return next(iter(self.deltas.values())).batch_size

    def to(self, device=None, dtype=None) -> "WeightContext":
        return WeightContext({k: d.to(device, dtype) for k, d in self.deltas.items()})

    def select(self, index) -> "WeightContext":
        first = next(iter(self.deltas.values()))
        index = torch.as_tensor(index, device=first.A.device)
        return WeightContext({k: d.select(index) for k, d in self.deltas.items()})


@dataclass
class TextInputs:
    """The prompt, for methods that condition on it (PPLLaVA, LinVT). Embeddings are the LLM's own."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    embeds: torch.Tensor | None = None


@dataclass
class LLMInfo:
    """What a method may know of the LLM: its width, depth, and (weight path) the target sites it writes to."""

    hidden_size: int
    num_layers: int
    sites: list["TargetSite"] = field(default_factory=list)
    site_keys: list[str] = field(default_factory=list)
    model_type: str = ""


@dataclass
class NoOptions:
    """A method without options of its own."""


class VideoMethod(nn.Module):
    """Base class of a video method. Subclasses set ``name``, ``kind`` and (optionally) ``Options``.

    ``encode(features, frame_mask, text)`` maps features (B, T, P, Dv) and a frame mask (B, T) (True = real frame)
    to a ``VideoContext``. It must not depend on the other samples of the batch (answers must not change with
    batching). Token methods return a ``TokenContext`` whose embeddings have the LLM's hidden size; weight
    methods return a ``WeightContext`` with an entry for each key of ``llm.site_keys``.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[Literal["tokens", "weights"]] = "tokens"
    Options: ClassVar[type] = NoOptions
    uses_text: ClassVar[bool] = False  # True: encode() needs the prompt (TextInputs)

    def __init__(self, config: "VideoAdapterConfig", llm: LLMInfo) -> None:
        super().__init__()
        self.config = config
        self.llm_info = llm
        self.options = self.parse_options(config.options)

    @property
    def vision_width(self) -> int:
        """Width Dv of the incoming video features (ValueError when the config does not know it)."""
        width = self.config.vision_hidden_size
        if width is None:
            raise ValueError("vision_hidden_size: unknown; pass a vision tower or set vision_hidden_size")
        return width

    @classmethod
    def parse_options(cls, options: dict[str, Any]) -> Any:
        """Validate a dict of options against ``Options``; unknown keys raise ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(options) - known)
        if unknown:
            hint = f"; options of {cls.name!r} are: {', '.join(sorted(known))}" if known else f"; {cls.name!r} has no options"
            raise ValueError(f"options: unknown option(s) {', '.join(unknown)} for method {cls.name!r}{hint}")
        return cls.Options(**options)

    def encode(
        self, features: torch.Tensor, frame_mask: torch.Tensor | None = None, text: TextInputs | None = None
    ) -> VideoContext:
        raise NotImplementedError

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named groups of parameters (for stage-wise training); default: everything in one group."""
        return {self.name: list(self.parameters())}


_REGISTRY: dict[str, type[VideoMethod]] = {}


def register_method(cls: type[VideoMethod] | None = None, *, name: str | None = None, overwrite: bool = False):
    """Register a ``VideoMethod`` subclass under ``cls.name`` (or ``name``). Usable as a decorator."""

    def _register(method_cls: type[VideoMethod]) -> type[VideoMethod]:
        if not (isinstance(method_cls, type) and issubclass(method_cls, VideoMethod)):
            raise TypeError(f"register_method: {method_cls!r} is not a VideoMethod subclass")
        key = name or method_cls.name
        if not key:
            raise ValueError(f"register_method: {method_cls.__name__} has no name")
        if method_cls.kind not in ("tokens", "weights"):
            raise ValueError(f"register_method: {method_cls.__name__}.kind must be 'tokens' or 'weights'")
        if not dataclasses.is_dataclass(method_cls.Options):
            raise TypeError(f"register_method: {method_cls.__name__}.Options must be a dataclass")
        if key in _REGISTRY and _REGISTRY[key] is not method_cls and not overwrite:
            raise ValueError(f"register_method: a method named {key!r} is already registered")
        method_cls.name = key
        _REGISTRY[key] = method_cls
        return method_cls

    return _register(cls) if cls is not None else _register


def unregister_method(name: str) -> None:
    _REGISTRY.pop(name, None)


def get_method(name: str) -> type[VideoMethod]:
    """The method class registered under ``name``; ValueError listing the available ones otherwise."""
    _ensure_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"method: unknown method {name!r}; available: {', '.join(available_methods())}") from None


def available_methods() -> list[str]:
    _ensure_builtin_methods()
    return sorted(_REGISTRY)


def _ensure_builtin_methods() -> None:
    # Built-in methods register themselves on import; importing here keeps `get_method` usable on its own.
    from . import llava, vipe  # noqa: F401
