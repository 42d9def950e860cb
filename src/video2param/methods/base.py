"""The method protocol, the two kinds of video context, and the method registry.

A method turns video features (B, T, P, Dv) into a ``VideoContext``:
- ``TokenContext``: embeddings (B, N, D) spliced into the prompt at the video placeholder (token path);
- ``WeightContext``: per-sample low-rank factors for target modules of the LLM (weight path).
A method never touches the LLM itself; ``VideoModel`` routes the context to the right injection path.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from ..validation import check_fields, check_kwargs

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

    def validate(self, hidden_size: int) -> None:
        """ValueError unless the embeddings fit an LLM of width ``hidden_size`` and are finite floats."""
        if self.embeds.shape[-1] != hidden_size:
            raise ValueError(
                f"context: TokenContext embeddings are {self.embeds.shape[-1]} wide but the LLM's hidden size is "
                f"{hidden_size} (was the context made by another model?)"
            )
        _check_finite_float("TokenContext.embeds", self.embeds)


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

    def validate(self, layout: dict[str, tuple[int, int]]) -> None:
        """ValueError unless the deltas cover exactly ``layout`` ({site key: (d_in, d_out)}) with finite floats.

        A context made by a model with other target sites (other ``inject_every``, ``targets`` or base) must never
        be applied partially.
        """
        missing = sorted(set(layout) - set(self.deltas))
        extra = sorted(set(self.deltas) - set(layout))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"no delta for {len(missing)} site(s) of this model ({_few(missing)})")
            if extra:
                parts.append(f"{len(extra)} delta(s) for sites this model does not have ({_few(extra)})")
            raise ValueError(
                "context: this WeightContext was made for another adapter layout: " + "; ".join(parts)
            )
        for key, (d_in, d_out) in layout.items():
            delta = self.deltas[key]
            if delta.A.shape[-1] != d_in or delta.B.shape[1] != d_out:
                raise ValueError(
                    f"context: delta {key!r} maps {delta.A.shape[-1]} → {delta.B.shape[1]} features but the site "
                    f"maps {d_in} → {d_out}"
                )
            _check_finite_float(f"WeightContext delta {key!r} A", delta.A)
            _check_finite_float(f"WeightContext delta {key!r} B", delta.B)
            if not math.isfinite(float(delta.scale)):
                raise ValueError(f"context: delta {key!r} has a non-finite scale {delta.scale!r}")


def _check_finite_float(what: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise ValueError(f"context: {what} must be floating point, got {tensor.dtype}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"context: {what} contains NaN or inf")


def _few(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … (+{len(items) - limit})" if len(items) > limit else "")


@dataclass
class Prompt:
    """The question a batch of videos is asked about: question tokens only, never the answer.

    ``input_ids`` (B, L) are the prompt as given (padding, the ``<video>`` mark and, in training, the answer may be
    among them); ``mask`` (B, L) is True exactly on the question's tokens. ``embeds`` are the LLM's own input
    embeddings of ``input_ids`` (the mark's row is never looked up), ``texts`` the decoded question per sample.
    The same question gives the same ``Prompt`` in training (teacher-forced, with labels) and in ``generate``.
    """

    input_ids: torch.Tensor
    mask: torch.Tensor
    embeds: torch.Tensor | None = None
    texts: list[str] | None = None


@dataclass
class LLMReadout:
    """What the frozen LLM computed while reading a video in context (deltas off).

    ``hidden_states[l]`` (B, L, D) is the residual stream entering decoder layer l (before its norm), for
    l = 0 .. num_layers-1; ``mask`` (B, L) is True on real (attended) positions.
    """

    hidden_states: tuple[torch.Tensor, ...]
    mask: torch.Tensor


# What a method may ask ``VideoModel`` for, besides the video features (see ``VideoMethod.needs``).
NEEDS = frozenset({"prompt", "prompt_embeds", "prompt_text", "text_encoder", "llm_readout", "tokenizer", "teacher"})


@dataclass
class Conditioning:
    """Everything besides the features that a method declared it needs; fields it did not declare stay None.

    - ``prompt``: the question (``Prompt``; embeddings with ``prompt_embeds``, texts with ``prompt_text``);
    - ``vision_views``: extra outputs of the vision tower by name (e.g. projected patch tokens);
    - ``text_encoder``: the frozen text tower given to ``wrap_model(text_encoder=...)``;
    - ``read_llm(context, prompt)``: runs the frozen LLM with a ``TokenContext`` spliced into ``prompt`` through
      the library's one splice path, weight deltas off, and returns an ``LLMReadout``;
    - ``tokenizer``: the tokenizer given to ``wrap_model(tokenizer=...)``, for text of the method's own (e.g. the
      instruction around the video that ``read_llm`` reads);
    - ``teacher(features, frame_mask=None, input_ids=None, attention_mask=None)``: the ``TokenContext`` that the
      frozen token adapter given as ``wrap_model(teacher=...)`` makes of these features (no gradient). A method
      that needs a teacher has an option ``teacher`` (str or None), where ``VideoModel`` records the teacher
      adapter's directory or Hub repo id so that ``from_pretrained`` can load it again.
    """

    prompt: Prompt | None = None
    vision_views: dict[str, torch.Tensor] = field(default_factory=dict)
    text_encoder: Any = None
    read_llm: Callable[..., LLMReadout] | None = None  # (context, input_ids=None, attention_mask=None)
    tokenizer: Any = None
    teacher: Callable[..., TokenContext] | None = None  # (features, frame_mask=None, input_ids=None, attention_mask=None)


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
    """Base class of a video method. Subclasses set ``name``, ``kind`` and (optionally) ``Options`` and ``needs``.

    ``encode(features, frame_mask, cond)`` maps features (B, T, P, Dv) and a frame mask (B, T) (True = real frame)
    to a ``VideoContext``; ``cond`` is a ``Conditioning`` holding what the method declared in ``needs`` (and
    ``vision_views``). It must not depend on the other samples of the batch (answers must not change with
    batching). Token methods return a ``TokenContext`` whose embeddings have the LLM's hidden size; weight
    methods return a ``WeightContext`` with an entry for each key of ``llm.site_keys``.
    A method never reaches into the LLM: what it needs of it comes through ``LLMInfo`` and ``Conditioning``.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[Literal["tokens", "weights"]] = "tokens"
    Options: ClassVar[type] = NoOptions
    needs: ClassVar[frozenset[str]] = frozenset()  # any of NEEDS
    # True when a fresh adapter leaves the LLM's outputs unchanged even with a video (zero-initialised deltas).
    identity_at_birth: ClassVar[bool] = False
    vision_views: ClassVar[tuple[str, ...]] = ()  # extra vision-tower outputs by name

    def __init__(self, config: "VideoAdapterConfig", llm: LLMInfo) -> None:
        super().__init__()
        self.config = config
        self.llm_info = llm
        self.options = self.parse_options(config.options)

    @classmethod
    def requirements(cls, options: dict[str, Any]) -> tuple[frozenset[str], tuple[str, ...]]:
        """(needs, vision_views) of an adapter with these options: the class's own, unless an option switches some
        off (e.g. PPLLaVA's uniform relevance reads no question and no text tower)."""
        return cls.needs, cls.vision_views

    @property
    def vision_width(self) -> int:
        """Width Dv of the incoming video features (ValueError when the config does not know it)."""
        width = self.config.vision_hidden_size
        if width is None:
            raise ValueError("vision_hidden_size: unknown; pass a vision tower or set vision_hidden_size")
        return width

    @classmethod
    def parse_options(cls, options: dict[str, Any]) -> Any:
        """Validate a dict of options against ``Options``: unknown keys, types and bounds raise ValueError naming them.

        Types and bounds are checked before ``Options`` is built (so its ``__post_init__`` never meets a string
        where it expects a number) and again after (a ``__post_init__`` may fill in computed defaults).
        """
        if not isinstance(options, dict):
            raise ValueError(f"options: expected a dict, got {type(options).__name__}")
        known = {f.name for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(options) - known)
        if unknown:
            hint = f"; options of {cls.name!r} are: {', '.join(sorted(known))}" if known else f"; {cls.name!r} has no options"
            raise ValueError(f"options: unknown option(s) {', '.join(unknown)} for method {cls.name!r}{hint}")
        check_kwargs(cls.Options, options, "options")
        parsed = cls.Options(**options)
        check_fields(parsed, "options")
        return parsed

    @classmethod
    def complete_saved_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """A saved adapter's options, each option it predates set to how such adapters behaved.

        An option added later with a default that changes behaviour records the old behaviour in its field metadata
        (``"saved_before"``); an adapter whose options lack it gets that value, not today's default, so it computes
        what it computed when it was saved.
        """
        filled = dict(options)
        for f in dataclasses.fields(cls.Options):
            if f.name not in filled and "saved_before" in f.metadata:
                filled[f.name] = f.metadata["saved_before"]
        return filled

    @classmethod
    def complete_config(cls, config: "VideoAdapterConfig", *, vision: Any = None,
                        text_encoder: Any = None) -> "VideoAdapterConfig":
        """The config with options filled in from the helper models ``VideoModel`` was given (e.g. a text tower's
        width); ValueError when a recorded option disagrees with them. Default: the config as it is."""
        return config

    def encode(
        self, features: torch.Tensor, frame_mask: torch.Tensor | None = None, cond: Conditioning | None = None
    ) -> VideoContext:
        raise NotImplementedError


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
        unknown = set(method_cls.needs) - NEEDS
        if unknown:
            raise ValueError(
                f"register_method: {method_cls.__name__}.needs has unknown entries {sorted(unknown)}; "
                f"known: {', '.join(sorted(NEEDS))}"
            )
        if "teacher" in method_cls.needs and "teacher" not in {f.name for f in dataclasses.fields(method_cls.Options)}:
            raise ValueError(
                f"register_method: {method_cls.__name__} needs a teacher, so its Options need a field 'teacher' "
                "(str | None) where the teacher adapter's location is recorded"
            )
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
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"method: unknown method {name!r}; available: {', '.join(available_methods())}") from None


def available_methods() -> list[str]:
    """Names of the registered methods (the built-ins register when ``video2param.methods`` is imported)."""
    return sorted(_REGISTRY)
