"""The adapter directory on disk: config JSON + safetensors + model card (see docs/format.md).

Only safe formats are read or written: JSON and safetensors. Nothing is unpickled or executed. A loaded adapter
is checked against the base model it is loaded onto (fingerprint) and against the method's own parameters
(names and shapes), and every difference is named in the error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import VideoAdapterConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
FORMAT_VERSION = 1


class AdapterMismatchError(ValueError):
    """The adapter does not fit the base model or the method it is loaded into."""


@dataclass(frozen=True)
class BaseModelFingerprint:
    """What identifies the base LM an adapter was trained on."""

    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    name: str | None = None

    @classmethod
    def of(cls, llm: torch.nn.Module) -> "BaseModelFingerprint":
        """The fingerprint of a HF causal LM, read without wrapping it (so a mismatch is found before any change)."""
        from . import targets

        cfg = llm.config
        return cls(
            model_type=str(getattr(cfg, "model_type", type(llm).__name__)),
            hidden_size=targets.hidden_size(llm),
            num_layers=targets.num_layers(llm),
            vocab_size=int(llm.get_input_embeddings().weight.shape[0]),
            name=getattr(cfg, "_name_or_path", None) or None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "vocab_size": self.vocab_size, "name": self.name}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BaseModelFingerprint":
        try:
            return cls(str(data["model_type"]), int(data["hidden_size"]), int(data["num_layers"]),
                       int(data["vocab_size"]), data.get("name"))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"adapter config: malformed base_model entry ({err!r})") from err

    def differences(self, other: "BaseModelFingerprint") -> list[str]:
        """Human-readable differences (the name is informative only and never blocks loading)."""
        out = []
        for key in ("model_type", "hidden_size", "num_layers", "vocab_size"):
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine != theirs:
                out.append(f"{key}: adapter has {mine!r}, model has {theirs!r}")
        return out


def save_adapter(directory: Path, config: VideoAdapterConfig, state: dict[str, torch.Tensor],
                 fingerprint: BaseModelFingerprint, card: str, extra: dict[str, Any] | None = None) -> None:
    """Write config, weights and card into an existing (empty, temporary) directory."""
    from . import __version__

    payload = {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "adapter": config.to_dict(),
        "base_model": fingerprint.to_dict(),
    }
    if extra:
        payload.update(extra)
    (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "library": "video2param"})
    (directory / CARD_NAME).write_text(card, encoding="utf-8")


@dataclass
class LoadedAdapter:
    config: VideoAdapterConfig
    fingerprint: BaseModelFingerprint
    state: dict[str, torch.Tensor]
    payload: dict[str, Any]


def read_adapter(directory: Path) -> LoadedAdapter:
    """Read and validate an adapter directory (JSON schema, safetensors only)."""
    config_path = directory / CONFIG_NAME
    weights_path = directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"adapter {directory}: missing {path.name}")
    try:
        payload = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"adapter {directory}: {CONFIG_NAME} is not valid JSON ({err})") from err
    if not isinstance(payload, dict) or "adapter" not in payload or "base_model" not in payload:
        raise ValueError(f"adapter {directory}: {CONFIG_NAME} lacks the 'adapter' and 'base_model' entries")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"adapter {directory}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    config = VideoAdapterConfig.from_dict(payload["adapter"])
    fingerprint = BaseModelFingerprint.from_dict(payload["base_model"])
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"adapter {directory}: {WEIGHTS_NAME} is not a readable safetensors file ({err})") from err
    return LoadedAdapter(config, fingerprint, state, payload)


def check_state(expected: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], where: str) -> None:
    """Raise AdapterMismatchError naming missing, unexpected and wrongly shaped tensors."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    shapes = [
        f"{k}: adapter {tuple(loaded[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(loaded))
        if loaded[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_short(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes: {_short(shapes)}")
    if problems:
        raise AdapterMismatchError(f"adapter {where} does not fit this model: " + "; ".join(problems))


def _short(items: list[str], limit: int = 6) -> str:
    head = ", ".join(items[:limit])
    return head + (f" (+{len(items) - limit} more)" if len(items) > limit else "")
