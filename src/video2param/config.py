"""`VideoAdapterConfig`: every setting of a video adapter, validated, with a JSON round trip.

Common fields live here; a method's own options live in that method's ``Options`` dataclass and travel in
``VideoAdapterConfig.options`` (a plain dict, so user-registered methods need no change here).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from .methods import get_method
from .validation import check_fields

Role = Literal["q", "k", "v", "o", "mlp"]
ROLE_NAMES: tuple[str, ...] = get_args(Role)

# Upper bounds: far above any real model, low enough that a typo (1e9 frames, rank 10**6) fails at once instead
# of allocating gigabytes first.
MAX_FRAMES = 16384
MAX_VISION_WIDTH = 16384
MAX_RANK = 2048
MAX_LAYERS = 4096


@dataclass
class VideoAdapterConfig:
    """Settings of a video adapter on a causal LM.

    Every field is checked against its type annotation and bounds (``video2param.validation.check_fields``): a
    bad value raises ``ValueError`` naming the field, e.g. ``rank: expected an int, got 8.0 (float)``.
    ``options`` holds the method's own settings; they are checked against the method's ``Options`` dataclass
    (see ``video2param.methods``).
    """

    method: str = field(default="vipe", metadata={"help": "Video method: one of the registered methods (llava, vipe, ...)."})
    num_frames: int = field(
        default=32,
        metadata={"help": "Frames sampled per video (upper bound for temporal embeddings).", "min": 1, "max": MAX_FRAMES},
    )
    vision_hidden_size: int | None = field(
        default=None,
        metadata={"help": "Width Dv of the video features; taken from the vision tower when one is given.",
                  "min": 1, "max": MAX_VISION_WIDTH},
    )
    rank: int = field(
        default=64, metadata={"help": "Rank r of the low-rank deltas (weight-space methods).", "min": 1, "max": MAX_RANK}
    )
    alpha: float = field(
        default=64.0, metadata={"help": "Delta scale numerator: deltas are scaled by alpha / rank.", "gt": 0}
    )
    inject_every: int | None = field(
        default=4,
        metadata={"help": "Weight-space methods: inject into every k-th decoder layer (None when inject_layers is set).",
                  "min": 1, "max": MAX_LAYERS},
    )
    inject_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Weight-space methods: explicit decoder layer indices (overrides inject_every).",
                  "min": 0, "max": MAX_LAYERS - 1},
    )
    targets: tuple[Role, ...] = field(
        default=ROLE_NAMES, metadata={"help": "Roles that receive deltas: any of q, k, v, o, mlp."}
    )
    video_token: str = field(default="<video>", metadata={"help": "Placeholder marking where a video goes in a prompt."})
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "Method-specific options (see the method's Options)."})

    def __post_init__(self) -> None:

        # The two normalisations a JSON file needs (lists for tuples) and a lone role given as a string.
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        elif isinstance(self.targets, list):
            self.targets = tuple(self.targets)
        if isinstance(self.inject_layers, tuple):
            self.inject_layers = list(self.inject_layers)
        check_fields(self, "")
        method_cls = get_method(self.method)  # raises ValueError listing the registered methods
        self.alpha = float(self.alpha)
        if self.inject_layers is not None:
            if not self.inject_layers:
                raise ValueError("inject_layers: expected a non-empty list of layer indices, got []")
            if len(set(self.inject_layers)) != len(self.inject_layers):
                raise ValueError(f"inject_layers: duplicate layer index in {self.inject_layers}")
            self.inject_layers = sorted(self.inject_layers)
        elif self.inject_every is None:
            raise ValueError("inject_every: set inject_every or inject_layers")
        if not self.targets:
            raise ValueError("targets: at least one role is needed")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets: duplicate role in {self.targets}")
        if not self.video_token.strip():
            raise ValueError("video_token: expected a non-empty string")
        # Validate (and fill defaults of) the method's own options now, not at first use (types, bounds, rules).
        self.options = dataclasses.asdict(method_cls.parse_options(self.options))

    @property
    def scale(self) -> float:
        """Multiplier of every low-rank delta (alpha / rank)."""
        return self.alpha / self.rank

    def method_options(self):
        """The method's options as its typed ``Options`` dataclass."""
        return get_method(self.method).parse_options(self.options)

    # ---- JSON round trip -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VideoAdapterConfig":
        if not isinstance(data, dict):
            raise ValueError(f"adapter config: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"adapter config: unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json_string() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "VideoAdapterConfig":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"adapter config {path}: not valid JSON ({err})") from err
        return cls.from_dict(data)

    @classmethod
    def split_kwargs(cls, method: str, kwargs: dict[str, Any]) -> "VideoAdapterConfig":
        """Build a config from flat keyword arguments: common fields by name, everything else is a method option."""
        common = {f.name for f in fields(cls)} - {"method", "options"}
        base = {k: v for k, v in kwargs.items() if k in common}
        options = {k: v for k, v in kwargs.items() if k not in common}
        return cls(method=method, options=options, **base)

