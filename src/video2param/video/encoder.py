"""Per-frame visual features from any HuggingFace vision tower: frozen, chunked, ``(T, P, Dv)``.

:class:`VisionEncoder` wraps a vision tower (``CLIPVisionModel``, ``SiglipVisionModel``, the vision tower
inside a VLM, or your own ``nn.Module``), preprocesses frames the way the tower's image processor does
(resize, centre crop, normalise), runs it frozen in eval mode under ``torch.inference_mode`` in chunks of
frames, and returns the patch tokens of one hidden layer (default: the penultimate) with the CLS token dropped.

Contract for a tower that is not a HuggingFace model: ``tower(pixel_values, output_hidden_states=True)``
with ``pixel_values`` of shape ``(n, 3, H, W)`` returns an object with a ``hidden_states`` attribute (a tuple
of ``(n, N, D)`` tensors, the embeddings first, as in transformers) and/or a ``last_hidden_state`` attribute,
or a plain ``(n, N, D)`` tensor. Pass ``image_mean``, ``image_std`` and ``image_size`` for such a tower, and
``hidden_layer=None`` when it only returns its last hidden state.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .cache import FeatureCache
from .digest import tensor_digest, weights_signature
from .io import VideoClip, VideoReader, check_sampling_args

__all__ = [
    "VisionEncoder",
    "FramePreprocessing",
    "EncodedVideo",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "PROGRESS_MIN_FRAMES",
]

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: ``progress=None`` shows a progress bar from this many frames on.
PROGRESS_MIN_FRAMES = 256

# PIL resample codes used in HF image-processor configs → torch interpolation modes.
_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "area", 5: "bilinear"}
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area")

# Where a composite model (dual encoder, VLM) keeps its vision tower.
_TOWER_PATHS = ("vision_model", "vision_tower", "model.vision_tower", "model.vision_model")

# Model types with known preprocessing when no processor config is given (values of their HF processors).
_CLIP_TYPES = {"clip", "clip_vision_model", "chinese_clip", "chinese_clip_vision_model", "x_clip", "metaclip_2"}
_SIGLIP_TYPES = {"siglip", "siglip_vision_model"}


@dataclass(frozen=True)
class FramePreprocessing:
    """How frames become the tower's ``pixel_values`` (mirrors an HF image processor)."""

    image_size: tuple[int, int] = field(metadata={"help": "(height, width) the tower receives."})
    image_mean: tuple[float, float, float] = field(metadata={"help": "Per-channel mean, on [0, 1] pixels."})
    image_std: tuple[float, float, float] = field(metadata={"help": "Per-channel std, on [0, 1] pixels."})
    shortest_edge: int | None = field(
        default=None,
        metadata={
            "help": "Resize so the shorter side has this length (aspect kept), then centre-crop to image_size; "
            "None resizes straight to image_size (SigLIP style)."
        },
    )
    interpolation: str = field(default="bicubic", metadata={"help": "One of nearest, bilinear, bicubic, area."})

    def __post_init__(self) -> None:
        try:
            size = _hw(self.image_size)
        except (TypeError, ValueError, KeyError):
            size = (0, 0)
        if min(size) < 1:
            raise ValueError(f"image_size must be a positive int or (height, width), got {self.image_size!r}")
        object.__setattr__(self, "image_size", size)
        for name in ("image_mean", "image_std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"{name} needs 3 values (RGB), got {value!r}")
            object.__setattr__(self, name, value)
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {self.image_std!r}")
        if self.shortest_edge is not None and self.shortest_edge < min(size):
            raise ValueError(f"shortest_edge {self.shortest_edge} is smaller than the crop {size}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {self.interpolation!r}")

    @classmethod
    def from_processor(cls, processor: Any, *, image_size: int | tuple[int, int] | None = None) -> "FramePreprocessing":
        """Read an HF image processor (object or its ``preprocessor_config.json`` dict).

        Understands ``size`` (``{"shortest_edge"}``, ``{"height", "width"}`` or an int), ``crop_size``,
        ``do_center_crop``, ``image_mean``/``image_std``, ``do_normalize`` and ``resample``. ``image_size``
        is used when the processor names no size.
        """
        if not isinstance(processor, Mapping):
            if not hasattr(processor, "to_dict"):
                raise ValueError(f"cannot read preprocessing from a {type(processor).__name__}")
            processor = processor.to_dict()
        if isinstance(processor.get("image_processor"), Mapping):  # processor_config.json nests it
            processor = processor["image_processor"]
        size = processor.get("size")
        crop = processor.get("crop_size")
        do_crop = bool(processor.get("do_center_crop", crop is not None))
        shortest: int | None = None
        target: tuple[int, int] | None = None
        if isinstance(size, Mapping) and size.get("shortest_edge"):
            shortest = int(size["shortest_edge"])
            target = _hw(crop) if do_crop and crop else (shortest, shortest)
        elif isinstance(size, Mapping) and size.get("height") and size.get("width"):
            target = (int(size["height"]), int(size["width"]))
        elif isinstance(size, (int, float)) and not isinstance(size, bool):
            if do_crop and crop:
                shortest, target = int(size), _hw(crop)
            else:
                target = (int(size), int(size))
        if target is None:
            if image_size is None:
                raise ValueError("the image processor names no usable size; pass image_size")
            target = _hw(image_size)
        if processor.get("do_normalize", True):
            mean, std = processor.get("image_mean"), processor.get("image_std")
            if mean is None or std is None:
                raise ValueError("the image processor has no image_mean/image_std; pass them")
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        resample = processor.get("resample", 3)
        interpolation = _RESAMPLE.get(int(resample), "bicubic") if isinstance(resample, (int, float)) else "bicubic"
        if shortest is not None:
            shortest = max(shortest, min(target))
        return cls(target, _three(mean), _three(std), shortest, interpolation)

    @classmethod
    def for_model_type(cls, model_type: str | None, image_size: int | tuple[int, int] | None) -> "FramePreprocessing | None":
        """Defaults of the HF processor of a known tower family (CLIP, SigLIP); None for others."""
        if model_type is None or image_size is None:
            return None
        size = _hw(image_size)
        if model_type in _CLIP_TYPES:
            return cls(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, shortest_edge=min(size), interpolation="bicubic")
        if model_type in _SIGLIP_TYPES:
            return cls(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), shortest_edge=None, interpolation="bicubic")
        return None

    def __call__(self, pixels: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
        """``(n, 3, H, W)`` float in ``[0, 1]`` → normalised ``(n, 3, *image_size)`` float32.

        ``inplace=True`` lets it overwrite ``pixels`` (saves a frame-sized copy per chunk).
        """
        x = pixels.float()
        fresh = inplace or x is not pixels
        height, width = x.shape[-2:]
        if self.shortest_edge is not None:
            scale = self.shortest_edge / min(height, width)
            resized = (max(self.image_size[0], round(height * scale)), max(self.image_size[1], round(width * scale)))
            x, fresh = self._resize(x, resized), fresh or tuple(x.shape[-2:]) != resized
            top = (x.shape[-2] - self.image_size[0]) // 2
            left = (x.shape[-1] - self.image_size[1]) // 2
            x = x[..., top : top + self.image_size[0], left : left + self.image_size[1]]
        else:
            x, fresh = self._resize(x, self.image_size), fresh or tuple(x.shape[-2:]) != self.image_size
        mean = torch.tensor(self.image_mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std) if fresh else (x - mean) / std

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        if self.interpolation in ("bilinear", "bicubic"):
            x = nn.functional.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=True)
            return x.clamp_(0.0, 1.0)  # bicubic overshoots; PIL clips to the pixel range too
        return nn.functional.interpolate(x, size=size, mode=self.interpolation)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class EncodedVideo:
    """Features of one video, with the timestamps of the frames they came from."""

    features: torch.Tensor = field(metadata={"help": "(T, P, Dv) patch features, tower dtype and device."})
    timestamps: torch.Tensor = field(metadata={"help": "float64 seconds of each frame, (T,)."})
    source: str = field(default="<frames>", metadata={"help": "Path or description of the video."})
    fps: float | None = field(default=None, metadata={"help": "Source frame rate, if known."})
    duration: float | None = field(default=None, metadata={"help": "Source duration in seconds, if known."})


def _hw(size) -> tuple[int, int]:
    if isinstance(size, Mapping):
        return int(size["height"]), int(size["width"])
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    height, width = size
    return int(height), int(width)


def _three(values) -> tuple[float, float, float]:
    values = [float(values)] * 3 if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(values) != 3:
        raise ValueError(f"expected 3 channel values, got {values!r}")
    return tuple(values)  # type: ignore[return-value]


def _get_path(module: nn.Module, dotted: str) -> Any:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _resolve_tower(module: nn.Module) -> nn.Module:
    """A composite model (CLIPModel, a VLM) → its vision tower; a tower → itself."""
    if not isinstance(module, nn.Module):
        raise ValueError(f"the vision tower must be a torch.nn.Module, got {type(module).__name__}")
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "vision_config", None) is not None:
        for path in _TOWER_PATHS:
            sub = _get_path(module, path)
            if isinstance(sub, nn.Module):
                return sub
        raise ValueError(
            f"{type(module).__name__} has a vision_config but no vision tower under any of {_TOWER_PATHS}; "
            "pass the vision tower module itself"
        )
    return module


def _config_image_size(config) -> tuple[int, int] | None:
    size = getattr(config, "image_size", None) if config is not None else None
    if size is None:
        return None
    return _hw(size if not isinstance(size, (list, tuple)) else tuple(size))


def _patch_grid(config, image_size: tuple[int, int]) -> int | None:
    patch = getattr(config, "patch_size", None) if config is not None else None
    if not patch:
        return None
    ph, pw = _hw(patch)
    return (image_size[0] // ph) * (image_size[1] // pw)


def _is_square(n: int) -> bool:
    return n > 0 and int(round(n**0.5)) ** 2 == n


class VisionEncoder(nn.Module):
    """Frozen vision tower → per-frame patch features ``(T, P, Dv)``.

    Args:
        tower: a HuggingFace vision model, a composite model with one inside (``CLIPModel``, a LLaVA-style
            VLM: its ``vision_model`` / ``vision_tower`` is used), or an ``nn.Module`` following the contract
            in the module docstring.
        image_mean, image_std, image_size: preprocessing overrides. Otherwise taken from ``preprocessing``
            (an HF image processor or its dict), else the defaults of the tower family (CLIP, SigLIP) with the
            size from ``tower.config.image_size``; a tower of unknown family needs them explicitly.
        hidden_layer: index into ``hidden_states`` (0 = embeddings, -1 = last layer); default -2, the
            penultimate layer. ``None`` uses ``last_hidden_state`` (note: SigLIP applies its final layer
            norm there, CLIP does not).
        drop_cls: drop the tokens in front of the patch grid (CLS, registers). ``None``: drop them when the
            token count exceeds the patch grid (CLIP has a CLS token, SigLIP has none).
        chunk_size: frames per forward pass; bounds peak memory independently of the video length.
        progress: tqdm progress bar; ``None`` shows it from :data:`PROGRESS_MIN_FRAMES` frames on.
        preprocessing: an HF image processor, its config dict, or a :class:`FramePreprocessing`.
        cache: a :class:`FeatureCache` that :meth:`encode_video` uses for video files by default (so a model
            built with ``wrap_model(..., vision=encoder)`` caches the features of every file it is given).

    The tower is frozen (``requires_grad=False``) and stays in eval mode even if ``.train()`` is called.
    Features come out in the tower's dtype on the tower's device.
    """

    def __init__(
        self,
        tower: nn.Module,
        *,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        image_size: int | tuple[int, int] | None = None,
        hidden_layer: int | None = -2,
        drop_cls: bool | None = None,
        chunk_size: int = 32,
        progress: bool | None = None,
        preprocessing: FramePreprocessing | Mapping[str, Any] | Any | None = None,
        cache: FeatureCache | None = None,
    ) -> None:
        super().__init__()
        if cache is not None and not isinstance(cache, FeatureCache):
            raise ValueError(f"cache must be a FeatureCache or None, got {type(cache).__name__}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if hidden_layer is not None and (isinstance(hidden_layer, bool) or not isinstance(hidden_layer, int)):
            raise ValueError(f"hidden_layer must be an int or None, got {hidden_layer!r}")
        if progress is not None and not isinstance(progress, bool):
            raise ValueError(f"progress must be True, False or None, got {progress!r}")
        self.tower = _resolve_tower(tower)
        self.hidden_layer = hidden_layer
        self.chunk_size = chunk_size
        self.progress = progress
        self.cache = cache
        self._identity: str | None = None
        self._identity_signature: str | None = None  # weights_signature() the identity was computed for

        config = getattr(self.tower, "config", None)
        self.model_type: str | None = getattr(config, "model_type", None)
        self.preprocessing = self._build_preprocessing(config, preprocessing, image_mean, image_std, image_size)
        config_size = _config_image_size(config)
        forward_params = _forward_parameters(self.tower)
        # A size other than the tower's native one needs interpolated position embeddings.
        self._interpolate = (
            config_size is not None
            and self.preprocessing.image_size != config_size
            and "interpolate_pos_encoding" in forward_params
        )

        self.tower.requires_grad_(False)
        self.tower.eval()
        tokens, self.hidden_size = self._probe()
        grid = _patch_grid(config, self.preprocessing.image_size)
        self.num_prefix_tokens = self._prefix_tokens(tokens, grid, drop_cls)
        self.num_patches = tokens - self.num_prefix_tokens

    # -- construction helpers --------------------------------------------------------------------------

    def _build_preprocessing(self, config, preprocessing, mean, std, size) -> FramePreprocessing:
        if isinstance(preprocessing, FramePreprocessing):
            base = preprocessing
        elif preprocessing is not None:
            base = FramePreprocessing.from_processor(preprocessing, image_size=size or _config_image_size(config))
        else:
            base = FramePreprocessing.for_model_type(self.model_type, size or _config_image_size(config))
        if base is None:
            missing = [n for n, v in (("image_mean", mean), ("image_std", std), ("image_size", size)) if v is None]
            if missing:
                raise ValueError(
                    f"cannot tell how to preprocess frames for {type(self.tower).__name__} "
                    f"(model_type={self.model_type!r}): pass {', '.join(missing)} or preprocessing="
                )
            return FramePreprocessing(_hw(size), _three(mean), _three(std), shortest_edge=min(_hw(size)))
        changes: dict[str, Any] = {}
        if mean is not None:
            changes["image_mean"] = _three(mean)
        if std is not None:
            changes["image_std"] = _three(std)
        if size is not None and _hw(size) != base.image_size:
            changes["image_size"] = _hw(size)
            changes["shortest_edge"] = min(_hw(size)) if base.shortest_edge is not None else None
        if not changes:
            return base
        fields = asdict(base)
        fields.update(changes)
        return FramePreprocessing(**fields)

    def _probe(self) -> tuple[int, int]:
        """One forward pass on a blank frame: checks the contract, learns token count and width."""
        height, width = self.preprocessing.image_size
        blank = torch.zeros(1, 3, height, width, device=self.device, dtype=self.dtype)
        try:
            with torch.inference_mode():
                hidden = self._hidden(blank)
        except (TypeError, AttributeError, RuntimeError, IndexError) as exc:
            raise ValueError(
                f"{type(self.tower).__name__} does not follow the vision-tower contract "
                f"(forward(pixel_values, output_hidden_states=True) on a (1, 3, {height}, {width}) batch): {exc}"
            ) from exc
        if hidden.dim() != 3 or hidden.shape[0] != 1:
            raise ValueError(
                f"{type(self.tower).__name__} returned hidden states of shape {tuple(hidden.shape)}; "
                "expected (batch, tokens, hidden)"
            )
        return int(hidden.shape[1]), int(hidden.shape[2])

    def _prefix_tokens(self, tokens: int, grid: int | None, drop_cls: bool | None) -> int:
        if drop_cls is False:
            return 0
        if grid is not None and tokens >= grid:
            prefix = tokens - grid
        elif _is_square(tokens):
            prefix = 0
        elif _is_square(tokens - 1):
            prefix = 1
        elif drop_cls:
            prefix = 1
        else:
            raise ValueError(
                f"cannot tell whether the {tokens} tokens of {type(self.tower).__name__} start with a CLS token; "
                "pass drop_cls=True or drop_cls=False"
            )
        if drop_cls and prefix == 0:
            raise ValueError(f"drop_cls=True, but {type(self.tower).__name__} has no token in front of its patches")
        return prefix

    # -- properties ------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        for tensor in self.tower.parameters():
            return tensor.device
        for tensor in self.tower.buffers():
            return tensor.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for tensor in self.tower.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.float32

    @property
    def identity(self) -> str:
        """Stable string naming what produces the features (for cache keys).

        Tower class, a hash of its config, a hash of its weights, the hidden layer, the dropped prefix
        tokens, the preprocessing and the dtype. Hashing the weights reads them all, so it is redone only when
        a cheap signature of the weights (storage, version counters, a few values each) changes: after
        ``load_state_dict``, an optimizer step, ``.to(...)`` or any in-place edit, the identity (and so every cache
        key) follows the weights actually used.
        """
        signature = weights_signature(self.tower.state_dict(keep_vars=True))
        if signature != self._identity_signature:
            self._identity, self._identity_signature = None, signature
        if self._identity is None:
            config = getattr(self.tower, "config", None)
            if config is not None and hasattr(config, "to_dict"):
                config_dict = {
                    k: v
                    for k, v in config.to_dict().items()
                    if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype")
                }
                config_hash = hashlib.sha256(json.dumps(config_dict, sort_keys=True, default=str).encode()).hexdigest()
            else:
                config_hash = "none"
            state = sorted(self.tower.state_dict().items())
            weights_hash = tensor_digest(state)
            pre_hash = hashlib.sha256(self.preprocessing.to_json().encode()).hexdigest()
            cls = type(self.tower)
            self._identity = (
                f"{cls.__module__}.{cls.__qualname__}|config={config_hash[:16]}|weights={weights_hash[:16]}"
                f"|layer={self.hidden_layer}|prefix={self.num_prefix_tokens}|pre={pre_hash[:16]}"
                f"|interp={int(self._interpolate)}|dtype={str(self.dtype).replace('torch.', '')}"
            )
        return self._identity

    def train(self, mode: bool = True) -> "VisionEncoder":
        super().train(mode)
        self.tower.eval()  # frozen: dropout and norm statistics never switch to training behaviour
        return self

    # -- encoding --------------------------------------------------------------------------------------

    def _hidden(self, pixel_values: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {"output_hidden_states": self.hidden_layer is not None}
        if self._interpolate:
            kwargs["interpolate_pos_encoding"] = True
        out = self.tower(pixel_values, **kwargs)
        if isinstance(out, torch.Tensor):
            if self.hidden_layer not in (None, -1):
                raise ValueError(
                    f"{type(self.tower).__name__} returns a single tensor, so only its last layer is available; "
                    "use hidden_layer=None"
                )
            return out
        hidden_states = getattr(out, "hidden_states", None)
        if hidden_states is None and isinstance(out, Mapping):
            hidden_states = out.get("hidden_states")
        if self.hidden_layer is None:
            last = getattr(out, "last_hidden_state", None)
            if last is None and isinstance(out, Mapping):
                last = out.get("last_hidden_state")
            if last is None:
                raise ValueError(f"{type(self.tower).__name__} output has no last_hidden_state")
            return last
        if not hidden_states:
            raise ValueError(
                f"{type(self.tower).__name__} did not return hidden_states; use hidden_layer=None to take "
                "last_hidden_state"
            )
        count = len(hidden_states)
        if not -count <= self.hidden_layer < count:
            raise ValueError(
                f"hidden_layer={self.hidden_layer} is out of range: the tower returns {count} hidden states "
                f"(embeddings + {count - 1} layers)"
            )
        return hidden_states[self.hidden_layer]

    def _check_frames(self, frames) -> torch.Tensor:
        if isinstance(frames, VideoClip):
            frames = frames.frames
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(frames)
        if not isinstance(frames, torch.Tensor):
            raise ValueError(f"frames must be a tensor, array or VideoClip, got {type(frames).__name__}")
        if frames.dim() != 4:
            raise ValueError(f"frames must be 4-D, got shape {tuple(frames.shape)}")
        if frames.dtype == torch.uint8:
            if frames.shape[-1] != 3:
                raise ValueError(f"uint8 frames must be (T, H, W, 3), got shape {tuple(frames.shape)}")
            return frames
        if frames.is_floating_point():
            if frames.shape[1] != 3:
                raise ValueError(f"float frames must be (T, 3, H, W), got shape {tuple(frames.shape)}")
            if frames.numel():
                lo, hi = float(frames.min()), float(frames.max())
                if lo < 0 or hi > 1:
                    raise ValueError(f"float frames must lie in [0, 1], found values in [{lo}, {hi}]")
            return frames
        raise ValueError(f"frames must be uint8 (T, H, W, 3) or float (T, 3, H, W), got dtype {frames.dtype}")

    def _pixel_values(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.dtype == torch.uint8:
            # Only uint8 crosses to the device; the float copy made here may be normalised in place.
            frames = frames.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
            return self.preprocessing(frames, inplace=True).to(self.dtype)
        return self.preprocessing(frames.to(self.device, non_blocking=True)).to(self.dtype)

    def _encode_chunk(self, frames: torch.Tensor) -> torch.Tensor:
        """``(n, ...)`` frames → ``(n, P, Dv)`` features (call under inference mode)."""
        hidden = self._hidden(self._pixel_values(frames))
        return hidden[:, self.num_prefix_tokens :]

    def _progress_bar(self, total: int | None):
        from tqdm.auto import tqdm

        show = self.progress if self.progress is not None else (total or 0) >= PROGRESS_MIN_FRAMES
        return tqdm(total=total, desc="encoding frames", unit="frame", disable=not show, leave=False)

    def _empty(self, *shape: int) -> torch.Tensor:
        # Allocated outside inference mode, so the features can feed a trainable module later.
        return torch.zeros(*shape, self.num_patches, self.hidden_size, dtype=self.dtype, device=self.device)

    def encode_frames(self, frames: torch.Tensor | np.ndarray | VideoClip) -> torch.Tensor:
        """Frames → ``(T, P, Dv)`` features.

        ``frames``: uint8 ``(T, H, W, 3)`` (as in :class:`VideoClip`) or float ``(T, 3, H, W)`` in ``[0, 1]``.
        Runs ``chunk_size`` frames at a time; only the output grows with ``T``.
        """
        frames = self._check_frames(frames)
        out = self._empty(frames.shape[0])
        with self._progress_bar(frames.shape[0]) as bar:
            self._encode_into(frames, out, bar)
        return out

    forward = encode_frames

    def _encode_into(self, frames: torch.Tensor, out: torch.Tensor, bar) -> None:
        with torch.inference_mode():
            for first in range(0, frames.shape[0], self.chunk_size):
                chunk = frames[first : first + self.chunk_size]
                out[first : first + chunk.shape[0]].copy_(self._encode_chunk(chunk))
                bar.update(chunk.shape[0])

    def encode_clips(self, clips: Sequence[VideoClip | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of videos → ``(B, Tmax, P, Dv)`` features, zero-padded, and a ``(B, Tmax)`` bool frame mask."""
        if not clips:
            raise ValueError("encode_clips needs at least one clip")
        checked = [self._check_frames(clip) for clip in clips]
        lengths = [clip.shape[0] for clip in checked]
        if min(lengths) == 0:
            raise ValueError(f"clip {lengths.index(0)} has no frames")
        out = self._empty(len(checked), max(lengths))
        mask = torch.zeros(len(checked), max(lengths), dtype=torch.bool, device=self.device)
        with self._progress_bar(sum(lengths)) as bar:
            for b, frames in enumerate(checked):
                self._encode_into(frames, out[b, : lengths[b]], bar)
                mask[b, : lengths[b]] = True
        return out, mask

    def encode_video(
        self,
        source: Any,
        num_frames: int | None = 32,
        fps: float | None = None,
        start: float | None = None,
        end: float | None = None,
        *,
        size: int | tuple[int, int] | None = None,
        source_fps: float | None = None,
        cache: FeatureCache | None = None,
    ) -> EncodedVideo:
        """Decode and encode a video without holding all its frames: memory is the features plus a chunk.

        Arguments as :func:`video2param.video.load_video`; ``source`` may also be a :class:`VideoClip`, whose
        frames are encoded as they are (they were sampled already). With a cache (``cache=``, else the encoder's
        own ``cache``) and a file path source, features are read from / written to the cache.
        """
        if isinstance(source, VideoClip):
            return EncodedVideo(self.encode_frames(source), source.timestamps, source.source, source.fps,
                                source.duration)
        if cache is not None and not isinstance(cache, FeatureCache):
            raise ValueError(f"cache must be a FeatureCache or None, got {type(cache).__name__}")
        cache = cache if cache is not None else self.cache
        if cache is not None and isinstance(source, (str, os.PathLike)) and Path(source).is_file():
            check_sampling_args(num_frames, fps, start, end, size)  # before hashing the file for the key
            settings = {"num_frames": num_frames, "fps": fps, "start": start, "end": end, "size": size}

            def compute() -> dict[str, Any]:
                with VideoReader(source, num_frames, fps, start, end, size=size) as reader:
                    encoded = self._encode_stream(reader)
                return {
                    "features": encoded.features,
                    "timestamps": encoded.timestamps,
                    "fps": encoded.fps,
                    "duration": encoded.duration,
                }

            entry = cache.get_or_compute(source, settings, self, compute)
            return EncodedVideo(
                features=entry["features"].to(device=self.device, dtype=self.dtype),
                timestamps=entry["timestamps"],
                source=os.fspath(source),
                fps=entry["fps"],
                duration=entry["duration"],
            )
        with VideoReader(source, num_frames, fps, start, end, size=size, source_fps=source_fps) as reader:
            return self._encode_stream(reader)

    def _encode_stream(self, reader: VideoReader) -> EncodedVideo:
        count = reader.num_frames
        out = self._empty(count) if count is not None else None
        pieces: list[torch.Tensor] = []
        times: list[tuple[tuple[int, ...], float]] = []
        pending: list[tuple[tuple[int, ...], np.ndarray]] = []

        def flush() -> None:
            if not pending:
                return
            frames = torch.from_numpy(np.stack([image for _, image in pending]))
            with torch.inference_mode():
                features = self._encode_chunk(frames)
            if out is None:
                pieces.append(features.clone())
            else:
                with torch.inference_mode():
                    for row, (indices, _) in enumerate(pending):
                        # A frame repeated in a short video is encoded once and copied.
                        out[list(indices)] = features[row : row + 1].expand(len(indices), -1, -1)
            bar.update(sum(len(indices) for indices, _ in pending))
            pending.clear()

        with self._progress_bar(count) as bar:
            for sample in reader:
                pending.append((sample.indices, sample.image))
                times.append((sample.indices, sample.timestamp))
                if len(pending) >= self.chunk_size:
                    flush()
            flush()
        total = count if count is not None else sum(len(i) for i, _ in times)
        timestamps = torch.empty(total, dtype=torch.float64)
        for indices, stamp in times:
            timestamps[list(indices)] = stamp
        if out is None:
            if not pieces:
                raise ValueError(f"{reader.source_name}: no frames to encode")
            out = torch.cat(pieces)
        return EncodedVideo(out, timestamps, reader.source_name, reader.fps, reader.duration)

    # -- loading ---------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> "VisionEncoder":
        """Load a vision tower and its image-processor settings with transformers.

        Works offline on a local directory (``config.json``, weights, and optionally
        ``preprocessor_config.json``). CLIP and SigLIP checkpoints load only their vision tower; other
        model types load through ``AutoModel`` (a composite model's vision tower is then picked out).
        For the tower of a large VLM, load the VLM yourself and pass its vision tower to the constructor.
        Remaining keyword arguments go to :class:`VisionEncoder`.
        """
        from transformers import AutoConfig, AutoModel

        name = os.fspath(name_or_path)
        config = AutoConfig.from_pretrained(name)
        model_cls = _vision_only_class(getattr(config, "model_type", None)) or AutoModel
        load_kwargs: dict[str, Any] = {}
        if dtype is not None:
            load_kwargs["dtype"] = dtype
        tower = model_cls.from_pretrained(name, **load_kwargs)
        if device is not None:
            tower.to(device)
        if "preprocessing" not in kwargs:
            processor = _read_processor_config(name)
            if processor is not None:
                kwargs["preprocessing"] = processor
        return cls(tower, **kwargs)


def _forward_parameters(module: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _vision_only_class(model_type: str | None):
    import transformers

    names = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}
    name = names.get(model_type or "")
    return getattr(transformers, name, None) if name else None


def _read_processor_config(name: str) -> dict[str, Any] | None:
    """``preprocessor_config.json`` (or the image part of ``processor_config.json``) of a checkpoint."""
    local = Path(name).is_dir()
    for filename in ("preprocessor_config.json", "processor_config.json"):
        if local:
            path = Path(name) / filename
            if not path.is_file():
                continue
        else:
            try:
                from huggingface_hub import hf_hub_download

                path = Path(hf_hub_download(name, filename))
            except Exception as exc:  # offline, missing file, no such repo: fall back to the defaults
                logger.info("no %s for %s (%s); using the tower family's defaults", filename, name, exc)
                continue
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if filename == "processor_config.json":
            data = data.get("image_processor") if isinstance(data, dict) else None
        if isinstance(data, dict):
            return data
    return None
