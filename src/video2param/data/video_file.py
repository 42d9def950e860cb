"""Write a clip as a video file (H.264 in MP4, with PyAV), e.g. a MovingShapes sample for ``video2param ask``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def write_mp4(path: str | os.PathLike, frames: torch.Tensor | np.ndarray, *, fps: int = 4, scale: int = 4,
              crf: int = 12) -> Path:
    """Write ``frames`` as an H.264 MP4 and return its path.

    ``frames``: ``(T, 3, H, W)`` float in ``[0, 1]`` (as MovingShapes items) or uint8 ``(T, H, W, 3)``. Each frame is
    enlarged ``scale`` times by pixel repetition (a 32-pixel frame is too small to watch, and the larger frame keeps
    the codec's half-resolution colour planes from smearing colours across object edges); reading it back at the
    original size (area resize) gives the frames again up to the codec's small error. Needs PyAV
    (``pip install video2param[video]``).
    """
    try:
        import av
    except ImportError as err:  # pragma: no cover - the dev and video extras install it
        raise ImportError("write_mp4 needs PyAV: pip install 'video2param[video]'") from err
    array = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.dtype != np.uint8:
        if array.ndim != 4 or array.shape[1] != 3:
            raise ValueError(f"frames: expected (T, 3, H, W) floats or (T, H, W, 3) uint8, got {array.shape}")
        array = np.clip(np.rint(array.transpose(0, 2, 3, 1) * 255.0), 0, 255).astype(np.uint8)
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise ValueError(f"frames: expected a non-empty (T, H, W, 3) clip, got {array.shape}")
    if scale > 1:
        array = array.repeat(scale, axis=1).repeat(scale, axis=2)
    height, width = array.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 needs even frame sizes, got {height}x{width}; use an even scale")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "medium", "crf": str(crf)}
        for frame in array:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path
