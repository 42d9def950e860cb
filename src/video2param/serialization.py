"""The adapter directory on disk: config JSON + safetensors + model card (see docs/format.md).

Only safe formats are read or written: JSON and safetensors. Nothing is unpickled or executed.

Saving writes the adapter's own three files into the directory, each atomically, and touches nothing else in it
(`save_adapter`). The config and the weights form a pair: the config records the SHA-256 of the weights file, and
a small journal (``.adapter_config.json.v2p-next``) written before the weights are replaced lets a save killed
between the two renames be completed, so the directory always loads as the old adapter or the new one
(`read_adapter`, `finish_interrupted_save`).

Loading checks the JSON schema and the config, the weights' digest against the config, that every floating tensor
is finite (`read_adapter`), the base model it is loaded onto (`BaseModelFingerprint`) and the method's own
parameters: names, shapes and dtypes (`check_state`). Every difference is named in the error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from .atomic_files import (
    directory_lock,
    discard,
    ensure_directory,
    fsync_directory,
    publish,
    remove_stale_temporaries,
    stage,
    write_bytes_atomically,
)
from .config import VideoAdapterConfig
from .validation import check_fields, check_value

__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "AdapterMismatchError",
    "BaseModelFingerprint",
    "LoadedAdapter",
    "check_finite",
    "check_metrics",
    "check_state",
    "finish_interrupted_save",
    "is_generated_card",
    "read_adapter",
    "save_adapter",
    "save_file_pair",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
FORMAT_VERSION = 1
#: Key of the weights file's SHA-256 in ``adapter_config.json`` (absent in adapters saved before it existed).
WEIGHTS_DIGEST_KEY = "weights_sha256"
_JOURNAL_SUFFIX = ".v2p-next"
_SAMPLES_PER_TENSOR = 8
# Sampled base weights agree when within bf16 rounding (2^-8 relative) with room to spare, so a model saved in
# float32 and loaded in bfloat16/float16 still matches; another model's weights are nowhere near.
_SAMPLE_RTOL = 2.0**-5
_SAMPLE_ATOL_FRACTION = 1e-3
_MAX_LISTED = 6


class AdapterMismatchError(ValueError):
    """The adapter does not fit the base model or the method it is loaded into."""


# ---- base-model fingerprint ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaseModelFingerprint:
    """What identifies the base LM an adapter was trained on.

    The shapes (`model_type`, `hidden_size`, `num_layers`, `vocab_size`) must match exactly. `weights_sample` is a
    few dozen values read at fixed positions of the embedding (and output head), and of one decoder layer: a
    different base with the same shapes differs there, while the same base in another dtype matches within
    rounding. `name` is informative only.
    """

    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    name: str | None = None
    weights_sample: tuple[float, ...] | None = None

    @classmethod
    def of(cls, llm: torch.nn.Module) -> "BaseModelFingerprint":
        """The fingerprint of a HF causal LM, read without wrapping it (so a mismatch is found before any change).

        The weights sample is the same whether or not a video adapter is attached (modules added by video2param
        are looked through).
        """
        from . import targets

        cfg = llm.config
        return cls(
            model_type=str(getattr(cfg, "model_type", type(llm).__name__)),
            hidden_size=targets.hidden_size(llm),
            num_layers=targets.num_layers(llm),
            vocab_size=_rows(llm.get_input_embeddings()),
            name=getattr(cfg, "_name_or_path", None) or None,
            weights_sample=sample_base_weights(llm),
        )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"model_type": self.model_type, "hidden_size": self.hidden_size,
                                "num_layers": self.num_layers, "vocab_size": self.vocab_size, "name": self.name}
        if self.weights_sample is not None:
            data["weights_sample"] = list(self.weights_sample)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "BaseModelFingerprint":
        """Read the ``base_model`` entry; raises ValueError naming a missing or malformed key."""
        if not isinstance(data, dict):
            raise ValueError(f"base_model: expected a JSON object, got {type(data).__name__}")
        missing = [k for k in ("model_type", "hidden_size", "num_layers", "vocab_size") if k not in data]
        if missing:
            raise ValueError(f"base_model: missing key(s) {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if isinstance(values.get("weights_sample"), list):
            values["weights_sample"] = tuple(values["weights_sample"])
        fingerprint = cls(**values)
        check_fields(fingerprint, "base_model")
        return fingerprint

    def differences(self, other: "BaseModelFingerprint") -> list[str]:
        """Human-readable shape differences (the name and the weights sample are not compared here)."""
        out = []
        for key in ("model_type", "hidden_size", "num_layers", "vocab_size"):
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine != theirs:
                out.append(f"{key}: adapter has {mine!r}, model has {theirs!r}")
        return out

    def weights_match(self, other: "BaseModelFingerprint") -> bool | None:
        """Whether the two weights samples agree (within low-precision rounding); None when either is unknown."""
        if self.weights_sample is None or other.weights_sample is None:
            return None
        mine, theirs = self.weights_sample, other.weights_sample
        if len(mine) != len(theirs):
            return False
        scale = max((abs(v) for v in theirs), default=0.0)
        atol = _SAMPLE_ATOL_FRACTION * scale + 1e-12
        return all(abs(a - b) <= atol + _SAMPLE_RTOL * abs(b) for a, b in zip(mine, theirs))


def _rows(embedding: torch.nn.Module) -> int:
    """Rows of the embedding table, also when its weight is partitioned (DeepSpeed ZeRO-3 leaves it 0 rows here)."""
    rows = getattr(embedding, "num_embeddings", None)
    return int(rows) if isinstance(rows, int) else int(embedding.weight.shape[0])


def sample_base_weights(llm: torch.nn.Module) -> tuple[float, ...] | None:
    """A few values at fixed positions of the LLM's weights, in float32: the input embedding, the output head
    when it is a separate matrix, and every floating parameter of the middle decoder layer.

    Quantized (integer) and meta-device tensors are skipped; None when nothing can be read.
    """
    from . import targets

    tensors: list[torch.Tensor] = []
    embedding = llm.get_input_embeddings().weight
    tensors.append(embedding)
    head = llm.get_output_embeddings() if hasattr(llm, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    if isinstance(head_weight, torch.Tensor) and head_weight is not embedding:
        tensors.append(head_weight)
    layers = targets.decoder_layers(llm)
    tensors.extend(_own_parameters(layers[len(layers) // 2]))
    values: list[float] = []
    try:
        with torch.no_grad():
            for tensor in tensors:
                if not tensor.is_floating_point() or tensor.is_meta or tensor.numel() == 0:
                    continue
                flat = tensor.detach().reshape(-1)
                index = torch.linspace(0, flat.numel() - 1, _SAMPLES_PER_TENSOR, device=flat.device).long()
                values.extend(float(f"{v:.7g}") for v in flat[index].float().cpu().tolist())
    except (RuntimeError, NotImplementedError):  # sharded or otherwise unreadable weights: no sample, no check
        return None
    return tuple(values) if values and all(math.isfinite(v) for v in values) else None


def _own_parameters(layer: torch.nn.Module) -> list[torch.Tensor]:
    """The layer's parameters in registration order, looking through modules that video2param put in."""
    out = []
    # A PEFT layer (a LoRA on the LLM) is looked through too: its own factors are not the base model's weights.
    adapter_parts = {id(m) for tuner in layer.modules() if type(tuner).__module__.startswith("peft.")
                     and callable(getattr(tuner, "get_base_layer", None))
                     for m in tuner.modules() if m is not tuner and not _inside(m, tuner.get_base_layer())}
    for module in layer.modules():
        if type(module).__module__.startswith("video2param.") or id(module) in adapter_parts:
            continue  # a wrapper: its wrapped original module is visited on its own
        out.extend(module.parameters(recurse=False))
    return out


def _inside(module: torch.nn.Module, root: torch.nn.Module) -> bool:
    return any(module is m for m in root.modules())


# ---- saving ----------------------------------------------------------------------------------------------------
def save_adapter(directory: str | Path, config: VideoAdapterConfig, state: Mapping[str, torch.Tensor],
                 fingerprint: BaseModelFingerprint, card: str | None, extra: dict[str, Any] | None = None) -> Path:
    """Write the adapter's files (config, weights, card) into `directory`, each atomically; returns the directory.

    Other files in `directory` are never touched; it is created if needed. A ``README.md`` that video2param did not
    write (see `is_generated_card`) is kept, and the card is then not written. A save killed at any instant leaves
    the previous adapter or the new one loadable (see the module docstring).

    Raises:
        OSError: the directory or a file cannot be written (full disk, no permission, ...); the message names the
            file.
    """
    from . import __version__

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def write_weights(path: Path) -> None:
        save_file(tensors, os.fspath(path), metadata={"format": "pt", "library": "video2param"})

    def make_config(weights_sha256: str) -> bytes:
        payload = {
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "adapter": config.to_dict(),
            "base_model": fingerprint.to_dict(),
            WEIGHTS_DIGEST_KEY: weights_sha256,
        }
        if extra:
            payload.update(extra)
        return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8")

    return save_file_pair(directory, weights_name=WEIGHTS_NAME, write_weights=write_weights,
                          config_name=CONFIG_NAME, make_config=make_config, card=card)


def save_file_pair(directory: str | Path, *, weights_name: str, write_weights: Callable[[Path], None],
                   config_name: str, make_config: Callable[[str], bytes], card: str | None) -> Path:
    """Replace a weights file and the config that describes it so that they are never seen out of step.

    Order: the new weights are written to a temporary file; a journal holding the new config and the new weights'
    SHA-256 is written; the weights replace the old ones; the config replaces the old one; the journal is removed;
    then the card. A reader that finds the journal and weights matching its digest uses the journal's config
    (`read_adapter`), and the next save completes it (`finish_interrupted_save`). Temporaries of killed saves are
    removed first, under a lock on the directory. Used for the video adapter and for PEFT exports.
    """
    directory = ensure_directory(directory)
    weights_path, config_path = directory / weights_name, directory / config_name
    journal_path = directory / _journal_name(config_name)
    with directory_lock(directory) as locked:
        finish_interrupted_save(directory, weights_name=weights_name, config_name=config_name)
        remove_stale_temporaries(directory, [weights_name, config_name, journal_path.name, CARD_NAME], locked=locked)
        staged = stage(weights_path, write_weights)
        try:
            digest = _sha256_file(staged)
            config_bytes = make_config(digest)
            journal = {"weights_sha256": digest, "config": config_bytes.decode("utf-8")}
            write_bytes_atomically(journal_path, json.dumps(journal).encode("utf-8"))
            publish(staged, weights_path)
        except BaseException:
            discard(staged)
            discard(journal_path)  # the weights were not replaced: the journal describes nothing on disk
            raise
        write_bytes_atomically(config_path, config_bytes)
        discard(journal_path)
        if card is not None:
            _write_card(directory / CARD_NAME, card)
        fsync_directory(directory)
    return directory


def check_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    """The ``metrics=`` of a save as a plain dict of finite numbers; ValueError naming a bad entry."""
    if metrics is None:
        return {}
    check_value(dict(metrics) if isinstance(metrics, Mapping) else metrics, dict[str, float], "metrics")
    return {str(k): v for k, v in metrics.items()}


def finish_interrupted_save(directory: str | Path, *, weights_name: str = WEIGHTS_NAME,
                            config_name: str = CONFIG_NAME) -> bool:
    """Complete a save that was killed between replacing the weights and replacing the config.

    When the journal's digest matches the weights on disk, its config is written in place; the journal is removed
    either way. Returns True when a save was completed. Called by every save; safe to call any time.
    """
    directory = Path(directory)
    journal = _read_journal(directory / _journal_name(config_name))
    if journal is None:
        discard(directory / _journal_name(config_name))  # unreadable: a journal is written atomically, so stale
        return False
    completed = False
    weights_path = directory / weights_name
    if weights_path.is_file() and _sha256_file(weights_path) == journal["weights_sha256"]:
        write_bytes_atomically(directory / config_name, journal["config"].encode("utf-8"))
        completed = True
        logger.info("completed an interrupted save in %s", directory)
    discard(directory / _journal_name(config_name))
    return completed


def is_generated_card(text: str) -> bool:
    """True for a ``README.md`` written by video2param (its front matter names the library)."""
    if not text.startswith("---\n"):
        return False
    front = text[4:].split("\n---", 1)[0]
    return "video2param" in front


def _write_card(path: Path, card: str) -> None:
    if path.exists():
        try:
            existing = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            existing = ""
        if not is_generated_card(existing):
            logger.warning("%s exists and was not written by video2param: keeping it (model card not written)", path)
            return
    write_bytes_atomically(path, card.encode("utf-8"))


def _journal_name(config_name: str) -> str:
    return f".{config_name}{_JOURNAL_SUFFIX}"


def _read_journal(path: Path) -> dict[str, str] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    if not (isinstance(data, dict) and isinstance(data.get("weights_sha256"), str)
            and isinstance(data.get("config"), str)):
        return None
    return data


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ---- loading ---------------------------------------------------------------------------------------------------
@dataclass
class LoadedAdapter:
    config: VideoAdapterConfig
    fingerprint: BaseModelFingerprint
    state: dict[str, torch.Tensor]
    payload: dict[str, Any]


def read_adapter(directory: str | Path) -> LoadedAdapter:
    """Read and validate an adapter directory (JSON schema, safetensors only, finite tensors).

    Raises:
        FileNotFoundError: the config or the weights file is missing.
        ValueError: invalid JSON or schema, an unsupported ``format_version``, an invalid config, an unreadable
            safetensors file, weights that are not the ones the config was saved with, or a tensor holding NaN/inf.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"adapter {directory}: missing {path.name}")
    try:
        config_text = config_path.read_text(encoding="utf-8")
        weights_bytes = weights_path.read_bytes()
    except OSError as err:
        message = f"adapter {directory}: cannot read {err.filename or 'a file'}: {err.strerror or err}"
        raise (OSError(err.errno, message) if err.errno is not None else OSError(message)) from err
    except UnicodeDecodeError as err:
        raise ValueError(f"adapter {directory}: {CONFIG_NAME} is not valid JSON ({err})") from err
    weights_sha256 = hashlib.sha256(weights_bytes).hexdigest()
    journal = _read_journal(directory / _journal_name(CONFIG_NAME))
    if journal is not None and journal["weights_sha256"] == weights_sha256:
        # A save was killed after replacing the weights and before replacing the config: the journal holds the
        # config that belongs to these weights.
        logger.info("adapter %s: completing an interrupted save (using the config of its journal)", directory)
        config_text = journal["config"]
    payload = _parse_payload(config_text, directory)
    recorded = payload.get(WEIGHTS_DIGEST_KEY)
    if recorded is not None and recorded != weights_sha256:
        raise ValueError(
            f"adapter {directory}: {WEIGHTS_NAME} (sha256 {weights_sha256[:12]}…) is not the file {CONFIG_NAME} was "
            f"saved with (sha256 {str(recorded)[:12]}…): the two files come from different saves. Save the adapter "
            f"again, or remove \"{WEIGHTS_DIGEST_KEY}\" from {CONFIG_NAME} to pair them anyway"
        )
    config = VideoAdapterConfig.from_dict(_with_saved_options(payload["adapter"]))
    fingerprint = BaseModelFingerprint.from_dict(payload["base_model"])
    try:
        state = load_safetensors_bytes(weights_bytes)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"adapter {directory}: {WEIGHTS_NAME} is not a readable safetensors file ({err})") from err
    check_finite(state, f"adapter {directory}")
    return LoadedAdapter(config, fingerprint, state, payload)


def _with_saved_options(adapter: Any) -> Any:
    """The saved adapter config with the options it predates set to their old behaviour
    (``VideoMethod.complete_saved_options``); anything malformed is left for ``from_dict`` to reject."""
    from .methods.base import get_method

    if not isinstance(adapter, dict) or not isinstance(adapter.get("options"), dict):
        return adapter
    try:
        method = get_method(adapter.get("method"))
    except (ValueError, TypeError):
        return adapter
    return {**adapter, "options": method.complete_saved_options(adapter["options"])}


def _parse_payload(text: str, directory: Path) -> dict[str, Any]:
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"adapter {directory}: {CONFIG_NAME} is not valid JSON ({err})") from err
    if not isinstance(payload, dict) or "adapter" not in payload or "base_model" not in payload:
        raise ValueError(f"adapter {directory}: {CONFIG_NAME} lacks the 'adapter' and 'base_model' entries")
    version = payload.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ValueError(f"adapter {directory}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    recorded = payload.get(WEIGHTS_DIGEST_KEY)
    if recorded is not None and not isinstance(recorded, str):
        raise ValueError(f"adapter {directory}: {WEIGHTS_DIGEST_KEY} must be a string, got {recorded!r}")
    return payload


def check_finite(state: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise ValueError naming the floating tensors that hold NaN or inf."""
    bad = sorted(name for name, tensor in state.items()
                 if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()))
    if bad:
        raise ValueError(f"{where}: tensor(s) {_short(bad)} contain NaN or inf")


def check_state(expected: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise AdapterMismatchError naming missing, unexpected, wrongly shaped and wrongly typed tensors.

    A floating parameter accepts any floating dtype (a half-precision save loads into a float32 model); anything
    else (int64, bool, ...) is refused rather than cast silently. A non-floating tensor must have its exact dtype.
    """
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    common = sorted(set(expected) & set(loaded))
    shapes = [
        f"{k}: adapter {tuple(loaded[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in common
        if loaded[k].shape != expected[k].shape
    ]
    dtypes = [
        f"{k}: adapter {_dtype_name(loaded[k])} vs model {_dtype_name(expected[k])}"
        for k in common
        if not _dtype_fits(loaded[k].dtype, expected[k].dtype)
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_short(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes: {_short(shapes)}")
    if dtypes:
        problems.append(f"wrong dtypes (not cast silently): {_short(dtypes)}")
    if problems:
        raise AdapterMismatchError(f"adapter {where} does not fit this model: " + "; ".join(problems))


def _dtype_fits(loaded: torch.dtype, expected: torch.dtype) -> bool:
    if expected.is_floating_point:
        return loaded.is_floating_point
    return loaded == expected


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).replace("torch.", "")


def _short(items: list[str], limit: int = _MAX_LISTED) -> str:
    head = ", ".join(items[:limit])
    return head + (f" (+{len(items) - limit} more)" if len(items) > limit else "")
