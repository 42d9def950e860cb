"""Every accepted form of ``videos=`` turned into checked features (B, T, P, Dv) and a frame mask (B, T).

Accepted: features (B,T,P,Dv); pixel frames (B,T,3,H,W) float in [0,1] or uint8 (B,T,H,W,3) with a vision tower;
a list with one entry per prompt of video files (path, bytes, binary file object), ``VideoClip``s, or per-video
tensors (frames or features, any T).

Files and clips take one pipeline: ``VisionEncoder.encode_video`` (streaming decode + chunked encoding, and the
encoder's ``FeatureCache`` when it has one), so a file given to the model and a file given to the encoder produce
the same features, from the same cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

_DEFAULT_FILE_FRAMES = 32  # frames sampled from a file when the adapter does not say (num_frames=None)


@dataclass
class VideoInputs:
    features: torch.Tensor  # (B, T, P, Dv)
    frame_mask: torch.Tensor | None  # (B, T) bool, None when every frame is real
    views: dict[str, torch.Tensor] = field(default_factory=dict)  # name → (B, T, P, ·), given with VideoFeatures


@dataclass
class VideoFeatures:
    """Precomputed features with the extra vision views a method reads: ``videos=VideoFeatures(features, ...)``.

    ``features`` (B, T, P, Dv); ``frame_mask`` (B, T) bool (True = real frame) or None; ``views`` maps a view's
    name to a (B, T, P, ·) tensor — e.g. ``{"projected": DualEncoder.derive_views(raw, ["projected"])["projected"]}``
    for PPLLaVA when ``features`` were transformed after the tower (standardised, say). A view the method needs and
    ``views`` lacks is derived from ``features`` by the model's dual encoder, or raises ValueError.
    """

    features: torch.Tensor
    frame_mask: torch.Tensor | None = None
    views: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "VideoFeatures":
        mask = None if self.frame_mask is None else self.frame_mask.to(device)
        return VideoFeatures(self.features.to(device=device, dtype=dtype), mask,
                             {k: v.to(device=device, dtype=dtype) for k, v in self.views.items()})


def _unpack_video_features(videos: "VideoFeatures", frame_mask: torch.Tensor | None):
    """(features, frame mask, views) of a ``VideoFeatures``; ValueError for anything that does not fit."""
    features = videos.features
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"videos: VideoFeatures.features must be a (B, T, P, Dv) tensor, got {got}")
    if frame_mask is not None and videos.frame_mask is not None:
        raise ValueError("frame_mask: given twice (as frame_mask= and in VideoFeatures); pass it once")
    if not isinstance(videos.views, dict):
        raise ValueError(f"videos: VideoFeatures.views must be a dict of tensors, got {type(videos.views).__name__}")
    for name, view in videos.views.items():
        where = f"videos: VideoFeatures.views[{name!r}]"
        if not isinstance(view, torch.Tensor) or view.dim() != 4 or view.shape[:3] != features.shape[:3]:
            got = tuple(view.shape) if isinstance(view, torch.Tensor) else type(view).__name__
            raise ValueError(f"{where}: expected shape {tuple(features.shape[:3])} + (width,) like the features, got {got}")
        if not view.is_floating_point() or not bool(torch.isfinite(view).all()):
            raise ValueError(f"{where}: must be finite floating point values")
    return features, frame_mask if frame_mask is not None else videos.frame_mask, dict(videos.views)


def prepare_video_inputs(videos: Any, frame_mask: torch.Tensor | None, *, vision: Any,
                         feature_dim: int | None, num_frames: int | None = None) -> VideoInputs:
    """Validate and encode ``videos``; errors name what is wrong (empty input, shape, width, batch, NaN/inf, mask).

    Args:
        videos: see the module docstring.
        frame_mask: (B, T) mask of real frames, or None (then derived for lists of videos of different lengths).
        vision: a ``VisionEncoder`` (needed for files, clips and pixel frames), or None.
        feature_dim: the adapter's feature width Dv, checked when given.
        num_frames: frames sampled from each video file.

    Raises:
        ValueError: naming the problem; ``VideoDecodeError`` (a ValueError) naming the file that cannot be read.
    """
    if isinstance(videos, np.ndarray):
        videos = torch.from_numpy(videos)
    views: dict[str, torch.Tensor] = {}
    if isinstance(videos, VideoFeatures):
        videos, frame_mask, views = _unpack_video_features(videos, frame_mask)
    if isinstance(videos, torch.Tensor):
        features = _tensor_to_features(videos, vision)
    elif isinstance(videos, (list, tuple)):
        if not videos:
            raise ValueError("videos: empty list (no video); pass one video per prompt")
        features, list_mask = _list_to_features(videos, vision, num_frames)
        if frame_mask is None:
            frame_mask = list_mask
    else:
        # A single path or clip: a batch of one.
        features, list_mask = _list_to_features([videos], vision, num_frames)
        if frame_mask is None:
            frame_mask = list_mask
    if not features.is_floating_point():
        raise ValueError(f"videos: features must be floating point, got {features.dtype}")
    if feature_dim is not None and features.shape[-1] != feature_dim:
        raise ValueError(
            f"videos: feature width {features.shape[-1]} does not match the adapter's vision_hidden_size {feature_dim}"
        )
    if 0 in features.shape:
        raise ValueError(f"videos: empty features (shape {tuple(features.shape)}: no video, frame, patch or width)")
    if not torch.isfinite(features).all():
        bad = (~torch.isfinite(features)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"videos: features of video(s) {bad} contain NaN or inf")
    if frame_mask is not None:
        frame_mask = _check_frame_mask(frame_mask, features.shape[:2])
        if bool(frame_mask.all()):
            frame_mask = None
    return VideoInputs(features, frame_mask, views)


def _tensor_to_features(videos: torch.Tensor, vision: Any) -> torch.Tensor:
    if videos.dim() in (4, 5) and 0 in videos.shape[:2]:
        raise ValueError(
            f"videos: an empty batch (shape {tuple(videos.shape)}: {videos.shape[0]} videos of {videos.shape[1]} "
            "frames); pass at least one video with at least one frame"
        )
    if videos.dim() == 4:
        return videos
    if videos.dim() == 5:
        if vision is None:
            raise ValueError(
                f"videos: got pixel frames of shape {tuple(videos.shape)} but the model has no vision tower; "
                "pass vision= to wrap_model or give features (B, T, P, Dv)"
            )
        _check_pixels(videos, "videos")
        return torch.stack([vision.encode_frames(v) for v in videos])
    raise ValueError(
        f"videos: expected features (B,T,P,Dv) or pixel frames (B,T,3,H,W), got a tensor of shape {tuple(videos.shape)}"
    )


def _check_pixels(frames: torch.Tensor, where: str) -> None:
    channels_first = frames.shape[-3] == 3
    channels_last = frames.shape[-1] == 3
    if not (channels_first or channels_last):
        raise ValueError(f"{where}: pixel frames need 3 channels, got shape {tuple(frames.shape)}")
    if 0 in frames.shape:
        raise ValueError(f"{where}: empty pixel frames (shape {tuple(frames.shape)})")
    if frames.is_floating_point() and not torch.isfinite(frames).all():
        raise ValueError(f"{where}: pixel frames contain NaN or inf")


def _list_to_features(items: list, vision: Any, num_frames: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    per_video = [_one_video_features(item, vision, num_frames, i) for i, item in enumerate(items)]
    widths = {(f.shape[1], f.shape[2]) for f in per_video}
    if len(widths) != 1:
        raise ValueError(f"videos: the videos disagree on patches/width: {sorted(widths)}")
    t_max = max(f.shape[0] for f in per_video)
    features = per_video[0].new_zeros((len(per_video), t_max, *per_video[0].shape[1:]))
    mask = torch.zeros((len(per_video), t_max), dtype=torch.bool)
    for b, f in enumerate(per_video):
        features[b, : f.shape[0]] = f.to(features.device)
        mask[b, : f.shape[0]] = True
    return features, (None if bool(mask.all()) else mask)


def _is_file_source(item: Any) -> bool:
    return isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(item, "read")


def _one_video_features(item: Any, vision: Any, num_frames: int | None, index: int) -> torch.Tensor:
    from .video.io import VideoClip

    where = f"videos[{index}]"
    if _is_file_source(item) or isinstance(item, VideoClip):
        if vision is None:
            kind = "a VideoClip" if isinstance(item, VideoClip) else "a video file"
            raise ValueError(f"{where}: {kind} needs a vision tower to become features (pass vision= to wrap_model)")
        if isinstance(item, VideoClip) and item.num_frames == 0:
            raise ValueError(f"{where}: the VideoClip has no frames")
        # The one pipeline for files and clips: streaming decode, chunked encoding, the encoder's feature cache.
        return vision.encode_video(item, num_frames=num_frames or _DEFAULT_FILE_FRAMES).features
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(item)
    if not isinstance(item, torch.Tensor):
        raise ValueError(
            f"{where}: expected a path, a VideoClip or a tensor (frames or features), got {type(item).__name__}"
        )
    if item.dim() == 3 and item.is_floating_point():  # (T, P, Dv) features
        if 0 in item.shape:
            raise ValueError(f"{where}: empty features (shape {tuple(item.shape)}: no frame, patch or width)")
        return item
    if item.dim() == 4:  # frames of one video
        if vision is None:
            raise ValueError(f"{where}: pixel frames need a vision tower (pass vision= to wrap_model)")
        if item.shape[0] == 0:
            raise ValueError(f"{where}: zero frames")
        _check_pixels(item, where)
        return vision.encode_frames(item)
    raise ValueError(f"{where}: expected features (T,P,Dv) or frames (T,3,H,W)/(T,H,W,3), got {tuple(item.shape)}")


def _check_frame_mask(frame_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if not isinstance(frame_mask, torch.Tensor) or frame_mask.shape != shape:
        got = tuple(frame_mask.shape) if isinstance(frame_mask, torch.Tensor) else type(frame_mask).__name__
        raise ValueError(f"frame_mask: expected shape {tuple(shape)} (B, T), got {got}")
    frame_mask = frame_mask.bool()
    empty = (~frame_mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"frame_mask: video(s) {empty} have no real frame")
    return frame_mask
