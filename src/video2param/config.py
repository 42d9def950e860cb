"""`VideoAdapterConfig`: every setting of a video adapter, validated, with a JSON round trip.

Common fields live here; a method's own options live in that method's ``Options`` dataclass and travel in
``VideoAdapterConfig.options`` (a plain dict, so user-registered methods need no change here).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ROLE_NAMES = ("q", "k", "v", "o", "mlp")


@dataclass
class VideoAdapterConfig:
    """Settings of a video adapter on a causal LM.

    A bad value raises ``ValueError`` naming the field. ``options`` holds the method's own settings; they are
    checked against the method's ``Options`` dataclass (see ``video2param.methods``).
    """

    method: str = field(default="vipe", metadata={"help": "Video method: one of the registered methods (llava, vipe, ...)."})
    num_frames: int = field(default=32, metadata={"help": "Frames sampled per video (upper bound for temporal embeddings)."})
    vision_hidden_size: int | None = field(
        default=None, metadata={"help": "Width Dv of the video features; taken from the vision tower when one is given."}
    )
    rank: int = field(default=64, metadata={"help": "Rank r of the low-rank deltas (weight-space methods)."})
    alpha: float = field(default=64.0, metadata={"help": "Delta scale numerator: deltas are scaled by alpha / rank."})
    inject_every: int | None = field(
        default=4, metadata={"help": "Weight-space methods: inject into every k-th decoder layer (None when inject_layers is set)."}
    )
    inject_layers: list[int] | None = field(
        default=None, metadata={"help": "Weight-space methods: explicit decoder layer indices (overrides inject_every)."}
    )
    targets: tuple[str, ...] = field(
        default=ROLE_NAMES, metadata={"help": "Roles that receive deltas: any of q, k, v, o, mlp."}
    )
    video_token: str = field(default="<video>", metadata={"help": "Placeholder marking where a video goes in a prompt."})
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "Method-specific options (see the method's Options)."})

    def __post_init__(self) -> None:
        from .methods.base import get_method  # late import: the registry imports this module

        if not isinstance(self.method, str):
            raise ValueError(f"method: expected a string, got {type(self.method).__name__}")
        method_cls = get_method(self.method)  # raises ValueError listing the registered methods
        _check_int("num_frames", self.num_frames, minimum=1)
        if self.vision_hidden_size is not None:
            _check_int("vision_hidden_size", self.vision_hidden_size, minimum=1)
        _check_int("rank", self.rank, minimum=1)
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            raise ValueError(f"alpha: expected a positive number, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if self.inject_layers is not None:
            if not isinstance(self.inject_layers, (list, tuple)) or not self.inject_layers:
                raise ValueError(f"inject_layers: expected a non-empty list of layer indices, got {self.inject_layers!r}")
            for i in self.inject_layers:
                _check_int("inject_layers", i, minimum=0)
            if len(set(self.inject_layers)) != len(self.inject_layers):
                raise ValueError(f"inject_layers: duplicate layer index in {self.inject_layers}")
            self.inject_layers = sorted(self.inject_layers)
        elif self.inject_every is None:
            raise ValueError("inject_every: set inject_every or inject_layers")
        if self.inject_every is not None:
            _check_int("inject_every", self.inject_every, minimum=1)
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)
        if not self.targets:
            raise ValueError("targets: at least one role is needed")
        for role in self.targets:
            if role not in ROLE_NAMES:
                raise ValueError(f"targets: unknown role {role!r}; roles are {', '.join(ROLE_NAMES)}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets: duplicate role in {self.targets}")
        if not isinstance(self.video_token, str) or not self.video_token.strip():
            raise ValueError("video_token: expected a non-empty string")
        if not isinstance(self.options, dict):
            raise ValueError(f"options: expected a dict, got {type(self.options).__name__}")
        # Validate (and fill defaults of) the method's own options now, not at first use.
        self.options = dataclasses.asdict(method_cls.parse_options(self.options))

    @property
    def scale(self) -> float:
        """Multiplier of every low-rank delta (alpha / rank)."""
        return self.alpha / self.rank

    def method_options(self):
        """The method's options as its typed ``Options`` dataclass."""
        from .methods.base import get_method

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
        except json.JSONDecodeError as err:
            raise ValueError(f"adapter config {path}: not valid JSON ({err})") from err
        return cls.from_dict(data)

    @classmethod
    def split_kwargs(cls, method: str, kwargs: dict[str, Any]) -> "VideoAdapterConfig":
        """Build a config from flat keyword arguments: common fields by name, everything else is a method option."""
        common = {f.name for f in fields(cls)} - {"method", "options"}
        base = {k: v for k, v in kwargs.items() if k in common}
        options = {k: v for k, v in kwargs.items() if k not in common}
        return cls(method=method, options=options, **base)


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
