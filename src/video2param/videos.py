"""Every accepted form of ``videos=`` turned into checked features (B, T, P, Dv) and a frame mask (B, T).

Accepted: features (B,T,P,Dv); pixel frames (B,T,3,H,W) float in [0,1] or uint8 (B,T,H,W,3) with a vision tower;
a list with one entry per prompt of file paths, ``VideoClip``s, or per-video tensors (frames or features, any T).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class VideoInputs:
    features: torch.Tensor  # (B, T, P, Dv)
    frame_mask: torch.Tensor | None  # (B, T) bool, None when every frame is real


def prepare_video_inputs(videos: Any, frame_mask: torch.Tensor | None, *, vision: Any,
                         feature_dim: int | None, num_frames: int | None = None) -> VideoInputs:
    """Validate and encode ``videos``; errors name what is wrong (shape, width, batch, NaN/inf, frame mask)."""
    if isinstance(videos, torch.Tensor):
        features = _tensor_to_features(videos, vision)
    elif isinstance(videos, (list, tuple)):
        if not videos:
            raise ValueError("videos: empty list")
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
    if features.shape[1] == 0 or features.shape[2] == 0:
        raise ValueError(f"videos: no frames or no patches (features shape {tuple(features.shape)})")
    if not torch.isfinite(features).all():
        bad = (~torch.isfinite(features)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"videos: features of video(s) {bad} contain NaN or inf")
    if frame_mask is not None:
        frame_mask = _check_frame_mask(frame_mask, features.shape[:2])
        if bool(frame_mask.all()):
            frame_mask = None
    return VideoInputs(features, frame_mask)


def _tensor_to_features(videos: torch.Tensor, vision: Any) -> torch.Tensor:
    if videos.dim() == 4:
        return videos
    if videos.dim() == 5:
        if vision is None:
            raise ValueError(
                f"videos: got pixel frames of shape {tuple(videos.shape)} but the model has no vision tower; "
                "pass vision= to wrap_model or give features (B, T, P, Dv)"
            )
        _check_pixels(videos)
        return torch.stack([vision.encode_frames(v) for v in videos])
    raise ValueError(
        f"videos: expected features (B,T,P,Dv) or pixel frames (B,T,3,H,W), got a tensor of shape {tuple(videos.shape)}"
    )


def _check_pixels(frames: torch.Tensor) -> None:
    channels_first = frames.shape[-3] == 3
    channels_last = frames.shape[-1] == 3
    if not (channels_first or channels_last):
        raise ValueError(f"videos: pixel frames need 3 channels, got shape {tuple(frames.shape)}")
    if frames.is_floating_point() and not torch.isfinite(frames).all():
        raise ValueError("videos: pixel frames contain NaN or inf")


def _list_to_features(items: list, vision: Any, num_frames: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    per_video = [_one_video_features(item, vision, num_frames, i) for i, item in enumerate(items)]
    widths = {(f.shape[1], f.shape[2]) for f in per_video}
    if len(widths) != 1:
        raise ValueError(f"videos: the videos disagree on patches/width: {sorted(widths)}")
    t_max = max(f.shape[0] for f in per_video)
    features = per_video[0].new_zeros((len(per_video), t_max, *per_video[0].shape[1:]))
    mask = torch.zeros((len(per_video), t_max), dtype=torch.bool)
    for b, f in enumerate(per_video):
        features[b, : f.shape[0]] = f
        mask[b, : f.shape[0]] = True
    return features, (None if bool(mask.all()) else mask)


def _one_video_features(item: Any, vision: Any, num_frames: int | None, index: int) -> torch.Tensor:
    from .video.io import VideoClip, load_video

    if isinstance(item, (str, Path)) or hasattr(item, "read"):
        item = load_video(item, num_frames=num_frames or 32)
    if isinstance(item, VideoClip):
        item = item.frames
    if not isinstance(item, torch.Tensor):
        raise ValueError(f"videos[{index}]: expected a path, a VideoClip or a tensor, got {type(item).__name__}")
    if item.dim() == 3 and item.is_floating_point():  # (T, P, Dv) features
        return item
    if item.dim() == 4:  # frames of one video
        if vision is None:
            raise ValueError(f"videos[{index}]: pixel frames need a vision tower (pass vision= to wrap_model)")
        _check_pixels(item)
        if item.shape[0] == 0:
            raise ValueError(f"videos[{index}]: zero frames")
        return vision.encode_frames(item)
    raise ValueError(f"videos[{index}]: expected features (T,P,Dv) or frames (T,3,H,W)/(T,H,W,3), got {tuple(item.shape)}")


def _check_frame_mask(frame_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if not isinstance(frame_mask, torch.Tensor) or frame_mask.shape != shape:
        got = tuple(frame_mask.shape) if isinstance(frame_mask, torch.Tensor) else type(frame_mask).__name__
        raise ValueError(f"frame_mask: expected shape {tuple(shape)} (B, T), got {got}")
    frame_mask = frame_mask.bool()
    empty = (~frame_mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"frame_mask: video(s) {empty} have no real frame")
    return frame_mask
