"""Decode and sample video into uint8 RGB frames.

One job: turn a video source (a file path, a file-like object, bytes, an array, a tensor or a list of PIL
images) into a :class:`VideoClip` of frames sampled *by timestamp*. Files are decoded with PyAV (the
``video2param[video]`` extra), seeking to keyframes for sparse sampling so that a long file is never decoded
whole into memory; only the sampled frames are kept.

Sampling rule (see docs/video.md):

* The window is ``[start, end)`` in seconds from the first frame (defaults: the whole video).
* ``fps=None``: ``N = num_frames`` target times at the centres of ``N`` equal segments of the window.
* ``fps=x``: ``N = round(window * x)`` (at least 1), capped at ``num_frames``; the ``N`` targets are then
  placed by the same segment-centre rule, so the rate is ``x`` unless the cap lowers it.
* ``num_frames=None`` lifts the cap; with ``fps=None`` too it returns every frame in the window.
* Each target takes the frame *on screen* at that time: the last frame whose timestamp is ``<=`` the
  target (the first frame for a target before it). A video with fewer frames than targets therefore
  repeats frames, so ``T == N`` always; the returned timestamps are those of the frames actually chosen.
"""

from __future__ import annotations

import bisect
import errno
import io as _io
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

# PyAV is optional (the `video` extra): it is imported lazily by _import_av(), only for files.

__all__ = [
    "VideoDecodeError",
    "VideoFileNotFoundError",
    "VideoPermissionError",
    "VideoClip",
    "SampledFrame",
    "DecodeStats",
    "VideoReader",
    "check_sampling_args",
    "load_video",
    "sample_times",
    "DENSE_SAMPLING_RATIO",
]

#: Above this fraction of the window's frames, one sequential pass is cheaper than seeking per target.
DENSE_SAMPLING_RATIO = 0.25

# Seek fallbacks (seconds before the target) when a seek lands after the target; then from the start.
_SEEK_BACKOFF_S = (1.0, 4.0)

VideoSource = Any  # str | os.PathLike | bytes | BinaryIO | np.ndarray | torch.Tensor | Sequence[PIL.Image]


class VideoDecodeError(ValueError):
    """A video source could not be read: missing, not a video, corrupt, truncated, or without frames.

    The message names the source and the cause.
    """


class VideoFileNotFoundError(VideoDecodeError, FileNotFoundError):
    """The video file does not exist (also a ``FileNotFoundError``)."""


class VideoPermissionError(VideoDecodeError, PermissionError):
    """The video file exists but may not be read (also a ``PermissionError``)."""


@dataclass
class VideoClip:
    """Frames sampled from one video."""

    frames: torch.Tensor = field(metadata={"help": "uint8 RGB frames, shape (T, H, W, 3)."})
    timestamps: torch.Tensor = field(
        metadata={"help": "float64 seconds from the first frame of the video, shape (T,), one per frame."}
    )
    fps: float | None = field(
        default=None, metadata={"help": "Source frame rate (average for variable rate); None when unknown."}
    )
    duration: float | None = field(default=None, metadata={"help": "Source duration in seconds, if known."})
    source: str = field(default="<frames>", metadata={"help": "Path or a short description of the source."})

    def __post_init__(self) -> None:
        if not isinstance(self.frames, torch.Tensor) or self.frames.dtype != torch.uint8:
            raise ValueError("VideoClip.frames must be a uint8 torch.Tensor")
        if self.frames.dim() != 4 or self.frames.shape[-1] != 3:
            raise ValueError(f"VideoClip.frames must have shape (T, H, W, 3), got {tuple(self.frames.shape)}")
        if self.timestamps.shape != (self.frames.shape[0],):
            raise ValueError(
                f"VideoClip.timestamps must have shape ({self.frames.shape[0]},), got {tuple(self.timestamps.shape)}"
            )

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    def __len__(self) -> int:
        return self.num_frames


@dataclass
class SampledFrame:
    """One decoded frame and the sample positions it fills (several when a short video repeats it)."""

    indices: tuple[int, ...]
    image: np.ndarray  # uint8 (H, W, 3)
    timestamp: float


@dataclass
class DecodeStats:
    """What decoding cost: useful to check that sparse sampling really seeks."""

    mode: str = "array"  # "array", "seek" or "sequential"
    frames_decoded: int = 0
    seeks: int = 0


# ----------------------------------------------------------------------------------------------- helpers


def _import_av():
    try:
        import av
    except ImportError as exc:  # pragma: no branch - message is the point
        raise ImportError(
            "Decoding video files needs PyAV, which is not installed. Install the extra with "
            "`pip install 'video2param[video]'` (or `pip install av`). Arrays, tensors and PIL images "
            "work without it."
        ) from exc
    return av


def check_sampling_args(num_frames, fps, start, end, size) -> tuple[int | None, float | None, float | None, float | None]:
    """Validate the sampling arguments of :func:`load_video` (ValueError naming the argument); return them
    normalised: ``(num_frames, fps, start, end)`` as int/float or None."""
    if num_frames is not None:
        if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer or None, got {num_frames!r}")
        num_frames = int(num_frames)

    def _seconds(name: str, value) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"{name} must be a number of seconds or None, got {value!r}")
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite, non-negative number of seconds, got {value!r}")
        return value

    start, end = _seconds("start", start), _seconds("end", end)
    if start is not None and end is not None and start >= end:
        raise ValueError(f"start ({start} s) must be before end ({end} s)")
    if fps is not None:
        if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating)):
            raise ValueError(f"fps must be a positive number or None, got {fps!r}")
        fps = float(fps)
        if not math.isfinite(fps) or fps <= 0:
            raise ValueError(f"fps must be a positive, finite number, got {fps!r}")
    _parse_size(size)
    return num_frames, fps, start, end


def _parse_size(size) -> int | tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"size must be positive, got {size!r}")
        return int(size)
    if (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in size)
    ):
        return int(size[0]), int(size[1])
    raise ValueError(f"size must be None, a positive int (shorter side) or a (height, width) pair, got {size!r}")


def _output_hw(height: int, width: int, size) -> tuple[int, int]:
    """Output (height, width) for a frame displayed at (height, width) under ``size``."""
    size = _parse_size(size)
    if size is None:
        return height, width
    if isinstance(size, tuple):
        return size
    # int: the shorter side becomes ``size``, the aspect ratio is kept.
    if height <= width:
        return size, max(1, round(width * size / height))
    return max(1, round(height * size / width)), size


def sample_times(t0: float, t1: float, num_frames: int | None, fps: float | None) -> np.ndarray:
    """Target times (seconds) of the sampling rule over the window ``[t0, t1)``; see the module docstring.

    ``num_frames=None`` with ``fps=None`` is "every frame" and has no fixed targets: callers handle it.
    """
    span = t1 - t0
    if span <= 0:
        raise ValueError(f"empty sampling window [{t0}, {t1})")
    if fps is None:
        if num_frames is None:
            raise ValueError("sample_times needs num_frames or fps")
        count = num_frames
    else:
        count = max(1, round(span * fps))
        if num_frames is not None:
            count = min(count, num_frames)
    return t0 + (np.arange(count, dtype=np.float64) + 0.5) * (span / count)


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(source, np.ndarray):
        return "<ndarray>"
    if isinstance(source, torch.Tensor):
        return "<tensor>"
    if hasattr(source, "read"):
        name = getattr(source, "name", None)
        return f"<file-like {name}>" if isinstance(name, str) else "<file-like>"
    if isinstance(source, (list, tuple)):
        return "<PIL images>"
    return f"<{type(source).__name__}>"


def _is_pil(obj) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(obj, Image.Image)


def _resize_uint8(frames: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Resize uint8 (T, H, W, 3) frames with antialiased bilinear interpolation."""
    if tuple(frames.shape[1:3]) == tuple(hw):
        return frames
    x = frames.permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _frames_from_array(source, desc: str) -> torch.Tensor:
    """Array-like source → uint8 (T, H, W, 3) tensor (a view when already in that form)."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise VideoDecodeError(f"{desc}: the list of frames is empty")
        if not all(_is_pil(im) for im in source):
            raise ValueError(f"{desc}: a list source must contain only PIL images")
        arrays = [np.asarray(im.convert("RGB")) for im in source]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"{desc}: the PIL images have different sizes {sorted(shapes)}; resize them first")
        return torch.from_numpy(np.stack(arrays))
    if _is_pil(source):
        return torch.from_numpy(np.asarray(source.convert("RGB")).copy())[None]
    tensor = torch.from_numpy(source) if isinstance(source, np.ndarray) else source
    if tensor.dim() != 4:
        raise ValueError(
            f"{desc}: expected 4 dimensions (T, H, W, 3) or (T, 3, H, W), got shape {tuple(tensor.shape)}; "
            "for a single image add a leading axis"
        )
    if tensor.shape[-1] != 3:
        if tensor.shape[1] != 3:
            raise ValueError(f"{desc}: expected 3 colour channels, got shape {tuple(tensor.shape)}")
        tensor = tensor.permute(0, 2, 3, 1)
    if tensor.shape[0] == 0:
        raise VideoDecodeError(f"{desc}: zero frames")
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.uint8:
        return tensor
    if tensor.is_floating_point():
        lo, hi = float(tensor.min()), float(tensor.max())
        if lo < 0 or hi > 1 or not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{desc}: float frames must lie in [0, 1], found values in [{lo}, {hi}]")
        return (tensor.float() * 255).round_().to(torch.uint8)
    raise ValueError(f"{desc}: frames must be uint8 (0..255) or float in [0, 1], got dtype {tensor.dtype}")


# Bytes read from the start of a file: enough for a YUV4MPEG2 header line, used to explain a failed open.
_HEAD_BYTES = 256

_FILE_KINDS = ((stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISCHR, "character device"),
               (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))

# Operating-system error codes that describe a real problem when FFmpeg reports them while opening a file we could
# read; any other code from a demuxer (e.g. "Device or resource busy" for a YUV4MPEG2 file with a bad frame size,
# an arithmetic slip inside FFmpeg) says nothing about the file and is not repeated as if it did.
_TRUE_OPEN_ERRNOS = {errno.EIO, errno.ENOMEM, errno.EACCES, errno.EPERM, errno.ENOENT}


def _check_video_file(path: Path, desc: str) -> bytes:
    """Check that `path` is a readable regular, non-empty file; return its first bytes.

    Every failure is a VideoDecodeError that says what is wrong with the path (a symlink loop is not a missing
    file, a FIFO would block forever, ...).
    """
    try:
        info = os.stat(path)  # follows symlinks
    except OSError as err:
        raise _path_error(path, desc, err) from None
    if stat.S_ISDIR(info.st_mode):
        raise VideoDecodeError(f"{desc}: is a directory, not a video file")
    for is_kind, kind in _FILE_KINDS:
        if is_kind(info.st_mode):
            raise VideoDecodeError(
                f"{desc}: is a {kind}, not a regular file; to read a stream, pass an open binary file object"
            )
    if info.st_size == 0:
        raise VideoDecodeError(f"{desc}: the file is empty (0 bytes)")
    try:
        with open(path, "rb") as handle:
            return handle.read(_HEAD_BYTES)
    except OSError as err:
        raise _path_error(path, desc, err) from None


def _path_error(path: Path, desc: str, err: OSError) -> VideoDecodeError:
    code = err.errno
    if code == errno.ENOENT:
        if os.path.islink(path):
            return VideoFileNotFoundError(
                f"{desc}: is a broken symbolic link (its target {os.readlink(path)!r} does not exist)"
            )
        parent = path.parent
        if not parent.exists():
            return VideoFileNotFoundError(f"{desc}: no such file (the directory {os.fspath(parent)!r} does not exist)")
        return VideoFileNotFoundError(f"{desc}: no such file")
    if code == errno.ELOOP:
        return VideoDecodeError(f"{desc}: cannot be opened: too many levels of symbolic links (a symlink loop)")
    if code in (errno.EACCES, errno.EPERM):
        return VideoPermissionError(f"{desc}: permission denied (the file exists but may not be read)")
    if code == errno.ENOTDIR:
        return VideoDecodeError(f"{desc}: a component of the path is a file, not a directory")
    if code == errno.ENAMETOOLONG:
        return VideoDecodeError(f"{desc}: the file name is too long")
    return VideoDecodeError(f"{desc}: cannot be read ({err.strerror or err})")


def _open_failure(exc: BaseException, head: bytes) -> str:
    """Why FFmpeg could not open a source, in words that describe the source."""
    if head.startswith(b"YUV4MPEG2"):
        problem = _y4m_header_problem(head)
        if problem:
            return problem
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code not in _TRUE_OPEN_ERRNOS and not isinstance(exc, _invalid_data_error()):
        return f"its header could not be parsed; FFmpeg error code {-code}"
    return _av_reason(exc)


def _invalid_data_error() -> type:
    try:
        import av

        return av.error.InvalidDataError
    except (ImportError, AttributeError):  # pragma: no cover
        return type(None)


def _y4m_header_problem(head: bytes) -> str | None:
    """What is wrong with a YUV4MPEG2 header line, or None when nothing obvious is."""
    line = head.split(b"\n", 1)[0]
    if b"\n" not in head:
        return "invalid YUV4MPEG2 header: no end of line in its first 256 bytes"
    fields = {}
    for token in line.split()[1:]:
        fields.setdefault(chr(token[0]), token[1:].decode("ascii", "replace"))
    try:
        width, height = int(fields["W"]), int(fields["H"])
    except KeyError:
        return "invalid YUV4MPEG2 header: no frame size (W and H are required)"
    except ValueError:
        return f"invalid YUV4MPEG2 header: frame size W{fields.get('W')} H{fields.get('H')} is not a number"
    # FFmpeg's av_image_check_size: positive, and (w + 128) * (h + 128) < INT_MAX / 8.
    if width <= 0 or height <= 0 or (width + 128) * (height + 128) >= (2**31 - 1) // 8:
        return f"invalid YUV4MPEG2 header: frame size {width}x{height} is not a valid picture size"
    return None


_DURATION_TAG = re.compile(r"^(\d+):(\d{1,2}):(\d{1,2}(?:\.\d+)?)$")


def _parse_duration_tag(text: str | None) -> float | None:
    """Matroska's per-stream ``DURATION`` tag, e.g. ``00:00:01.334000000``."""
    if not text:
        return None
    match = _DURATION_TAG.match(text.strip())
    if not match:
        return None
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


# ------------------------------------------------------------------------------------------------ reader


@dataclass
class _Decoded:
    """A decoded frame and its time; converted to RGB only if it is chosen."""

    time: float
    frame: Any  # av.VideoFrame
    duration: float | None


class VideoReader:
    """Sampled frames of one video, decoded lazily in time order.

    ``VideoReader(source, ...)`` validates the arguments, opens the source and plans the target times;
    iterating yields :class:`SampledFrame` objects (each decoded frame once, with every sample position it
    fills) without keeping earlier frames, which lets an encoder consume a long video chunk by chunk.
    :meth:`read` collects everything into a :class:`VideoClip`. Arguments are those of :func:`load_video`.
    Use it as a context manager (or call :meth:`close`) so the file is closed.
    """

    def __init__(
        self,
        source: VideoSource,
        num_frames: int | None = 32,
        fps: float | None = None,
        start: float | None = None,
        end: float | None = None,
        *,
        size: int | tuple[int, int] | None = None,
        source_fps: float | None = None,
    ) -> None:
        self.num_frames_arg, self.sample_fps, self.start, self.end = check_sampling_args(num_frames, fps, start, end, size)
        self.size = _parse_size(size)
        self.source_name = _describe(source)
        self.stats = DecodeStats()
        self._container = None
        self._array: torch.Tensor | None = None
        self._consumed = False
        self._out_hw: tuple[int, int] | None = None
        self._seek_enabled = False
        if source_fps is not None:
            if isinstance(source_fps, bool) or not isinstance(source_fps, (int, float)) or not source_fps > 0:
                raise ValueError(f"source_fps must be a positive number, got {source_fps!r}")
            source_fps = float(source_fps)

        if isinstance(source, (np.ndarray, torch.Tensor, list, tuple)) or _is_pil(source):
            self._open_array(source, source_fps)
        else:
            if source_fps is not None:
                raise ValueError("source_fps is only for arrays, tensors and PIL images; files carry their own")
            self._open_file(source)
        self._plan()

    # -- opening ---------------------------------------------------------------------------------------

    def _open_array(self, source, source_fps: float | None) -> None:
        self._array = _frames_from_array(source, self.source_name)
        count = self._array.shape[0]
        # Without a known rate, time is counted in frames (frame i is at "second" i).
        self.fps = source_fps
        rate = source_fps or 1.0
        self._times = np.arange(count, dtype=np.float64) / rate
        self.duration = count / source_fps if source_fps else None
        self._window_end_default = count / rate
        self._rate = source_fps
        if self.sample_fps is not None and source_fps is None:
            raise ValueError(
                f"{self.source_name}: fps-based sampling needs the frame rate of the frames; pass source_fps="
            )

    def _open_file(self, source) -> None:
        av = _import_av()
        self._av = av
        desc = self.source_name
        head = b""
        if isinstance(source, (str, os.PathLike)):
            head = _check_video_file(Path(source), desc)
            source = os.fspath(source)
        elif isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise VideoDecodeError(f"{desc}: empty bytes")
            head = bytes(source[:_HEAD_BYTES])
            source = _io.BytesIO(bytes(source))
        elif not hasattr(source, "read"):
            raise ValueError(
                f"unsupported video source of type {type(source).__name__}: expected a path, bytes, a file-like "
                "object, a numpy array, a torch tensor or a list of PIL images"
            )
        self._open_arg = source
        try:
            self._container = av.open(source, mode="r", metadata_errors="ignore")
        except av.FFmpegError as exc:
            raise VideoDecodeError(f"{desc}: not a readable video file ({_open_failure(exc, head)})") from exc
        try:
            self._init_stream()
        except BaseException:
            self.close()
            raise

    def _init_stream(self) -> None:
        av, container, desc = self._av, self._container, self.source_name
        attached = av.stream.Disposition.attached_pic
        streams = [s for s in container.streams.video if not (s.disposition & attached)]
        if not streams:
            audio = len(container.streams.audio)
            if audio:
                raise VideoDecodeError(
                    f"{desc}: has no video stream (audio-only file with {audio} audio stream(s))"
                )
            raise VideoDecodeError(f"{desc}: has no video stream")
        stream = self._stream = streams[0]
        self._stream_position = list(container.streams.video).index(stream)
        stream.thread_type = "AUTO"  # frame + slice threads: decoding is the main cost of loading
        self._tb = float(stream.time_base) if stream.time_base else 1e-6
        self._origin = stream.start_time if stream.start_time is not None else 0
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        self._rate = float(rate) if rate else None
        self.fps = self._rate
        self.duration = self._declared_duration()
        if self.duration is None or self.duration <= 0:
            self.duration = self._scan_duration()
        if self.duration is None or self.duration <= 0:
            raise VideoDecodeError(f"{desc}: the video stream contains no frames")
        self._window_end_default = self.duration

    def _declared_duration(self) -> float | None:
        stream, container = self._stream, self._container
        if stream.duration:
            return stream.duration * self._tb
        tagged = _parse_duration_tag(stream.metadata.get("DURATION") or stream.metadata.get("duration"))
        if tagged:
            return tagged
        # The container's duration covers every stream; trust it only when the video is alone.
        if container.duration and len(container.streams) == 1:
            return container.duration / 1_000_000
        return None

    def _scan_duration(self) -> float | None:
        """End time from packet timestamps (demux only, no decoding), then back to the start.

        Returns None when the stream has no packet with a timestamp (then there is nothing to decode).
        """
        end = None
        try:
            for packet in self._container.demux(self._stream):
                if packet.pts is None or not packet.size:
                    continue
                last = (packet.pts - self._origin + (packet.duration or 0)) * self._tb
                end = last if end is None else max(end, last)
        except self._av.FFmpegError as exc:
            raise VideoDecodeError(f"{self.source_name}: corrupt video data ({_av_reason(exc)})") from exc
        if end is None:
            return None
        self._rewind()
        # A single still frame without a duration gets one frame interval.
        return end if end > 0 else (1.0 / self._rate if self._rate else 1e-3)

    def _rewind(self) -> None:
        """Back to the first packet: by seeking, or by reopening when the container cannot seek."""
        try:
            self._container.seek(self._origin, stream=self._stream, backward=True)
            return
        except self._av.FFmpegError:
            pass
        source = self._open_arg
        if hasattr(source, "seek"):
            source.seek(0)
        self._container.close()
        self._container = self._av.open(source, mode="r", metadata_errors="ignore")
        self._stream = self._container.streams.video[self._stream_position]
        self._stream.thread_type = "AUTO"

    # -- planning --------------------------------------------------------------------------------------

    def _plan(self) -> None:
        total = self._window_end_default
        t0 = self.start or 0.0
        if t0 >= total:
            self.close()
            raise ValueError(
                f"{self.source_name}: start={t0} s is at or beyond the end of the video ({total:.3f} s)"
            )
        # An end past the video is clamped to its end.
        t1 = min(self.end, total) if self.end is not None else total
        self.window = (t0, t1)
        if self.num_frames_arg is None and self.sample_fps is None:
            self.target_times = None  # every frame in the window
        else:
            self.target_times = sample_times(t0, t1, self.num_frames_arg, self.sample_fps)

    @property
    def num_frames(self) -> int | None:
        """Number of frames the clip will have (None for "every frame" until decoded)."""
        if self.target_times is not None:
            return len(self.target_times)
        if self._array is not None:
            t0, t1 = self.window
            return int(((self._times >= t0) & (self._times < t1)).sum())
        return None

    # -- iteration -------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[SampledFrame]:
        if self._consumed:
            raise RuntimeError("a VideoReader can be iterated once; create a new one")
        self._consumed = True
        if self._array is not None:
            yield from self._iter_array()
            return
        if self._container is None:
            raise RuntimeError("the VideoReader is closed")
        try:
            yield from self._iter_file()
        finally:
            self.close()

    def _iter_array(self) -> Iterator[SampledFrame]:
        frames, times = self._array, self._times
        if self.target_times is None:
            t0, t1 = self.window
            inside = np.flatnonzero((times >= t0 - 1e-9) & (times < t1)).tolist()
            groups = [(idx, (k,)) for k, idx in enumerate(inside)]
        else:
            picks = np.clip(np.searchsorted(times, self.target_times + 1e-9, side="right") - 1, 0, None)
            groups = []
            for k, idx in enumerate(picks.tolist()):
                if groups and groups[-1][0] == idx:
                    groups[-1] = (idx, groups[-1][1] + (k,))
                else:
                    groups.append((idx, (k,)))
        out_hw = _output_hw(frames.shape[1], frames.shape[2], self.size)
        for idx, targets in groups:
            image = _resize_uint8(frames[idx : idx + 1], out_hw)[0].numpy()
            yield SampledFrame(targets, image, float(times[idx]))

    def _decode_from_here(self) -> Iterator[_Decoded]:
        """Decoded frames from the container's current position, with times; FFmpeg errors translated."""
        stream, tb, origin = self._stream, self._tb, self._origin
        iterator = self._container.decode(stream)
        last_time = None
        default_step = 1.0 / self._rate if self._rate else None
        while True:
            try:
                frame = next(iterator)
            except StopIteration:
                return
            except self._av.FFmpegError as exc:
                where = f" after {last_time:.3f} s" if last_time is not None else ""
                raise VideoDecodeError(
                    f"{self.source_name}: corrupt video data{where} ({_av_reason(exc)})"
                ) from exc
            self.stats.frames_decoded += 1
            if frame.pts is not None:
                time = (frame.pts - origin) * tb
            elif last_time is not None and default_step:
                time = last_time + default_step
            else:
                time = 0.0 if last_time is None else last_time
            duration = frame.duration * tb if getattr(frame, "duration", 0) else default_step
            last_time = time
            yield _Decoded(time, frame, duration)

    def _keyframe_times(self) -> list[float]:
        try:
            entries = self._stream.index_entries
            return sorted(
                (e.timestamp - self._origin) * self._tb for e in entries if e.is_keyframe and e.timestamp is not None
            )
        except (AttributeError, self._av.FFmpegError):  # older PyAV: no index access
            return []

    def _seek_to(self, t: float) -> tuple[Iterator[_Decoded], _Decoded | None] | None:
        """Seek so that the first decoded frame is at or before ``t``.

        Returns ``(iterator, first decoded frame or None at the end)``, or ``None`` when the container
        cannot seek (seeking is then switched off and decoding goes on forward, which is always correct
        because targets only move forward). Bounded: the target, two backoffs, then the very start.
        """
        offsets = [t] + [t - b for b in _SEEK_BACKOFF_S if t - b > 0] + [0.0]
        for offset in offsets:
            try:
                self._container.seek(self._origin + int(offset / self._tb), stream=self._stream, backward=True)
            except self._av.FFmpegError:
                self._seek_enabled = False
                return None
            self.stats.seeks += 1
            iterator = self._decode_from_here()
            first = next(iterator, None)
            if (first is not None and first.time <= t + 1e-9) or offset <= 0:
                return iterator, first
        raise AssertionError("unreachable: the last offset is 0")  # pragma: no cover

    def _iter_file(self) -> Iterator[SampledFrame]:
        if self.target_times is None:
            yield from self._iter_file_all()
            return
        targets = self.target_times
        t0, t1 = self.window
        expected_frames = (t1 - t0) * self._rate if self._rate else None
        dense = expected_frames is None or len(targets) > DENSE_SAMPLING_RATIO * expected_frames
        keyframes = self._keyframe_times()
        self._seek_enabled = len(keyframes) >= 2
        self.stats.mode = "sequential" if dense or not self._seek_enabled else "seek"

        iterator: Iterator[_Decoded] | None = None
        prev: _Decoded | None = None  # last frame at or before the current target
        nxt: _Decoded | None = None  # first frame after it (lookahead), None when not pulled yet
        eof = False
        truncation_checked = False
        group: list[int] = []
        group_frame: _Decoded | None = None

        for k, t in enumerate(targets.tolist()):
            if self._seek_enabled and (self.stats.mode == "seek" or iterator is None):
                latest = nxt.time if nxt is not None else (prev.time if prev is not None else -math.inf)
                # Seek only when a keyframe lies between what was decoded and the target: decoding
                # forward from there is what a seek would do anyway, minus the skipped frames.
                after = bisect.bisect_right(keyframes, max(latest, 0.0))
                if after < len(keyframes) and keyframes[after] <= t:
                    landed = self._seek_to(t)
                    if landed is not None:
                        iterator, nxt = landed
                        prev, eof = None, nxt is None
            if iterator is None:
                iterator = self._decode_from_here()
            while True:
                if nxt is None and not eof:
                    nxt = next(iterator, None)
                    eof = nxt is None
                if nxt is not None and nxt.time <= t + 1e-9:
                    prev, nxt = nxt, None
                    continue
                break
            chosen = prev if prev is not None else nxt
            if chosen is None:
                raise VideoDecodeError(f"{self.source_name}: the video stream contains no decodable frames")
            if eof and prev is not None and not truncation_checked:
                truncation_checked = True
                self._check_truncation(prev)
            if group_frame is not None and chosen is not group_frame:
                yield self._emit(group, group_frame)
                group = []
            group_frame = chosen
            group.append(k)
        if group_frame is not None:
            yield self._emit(group, group_frame)

    def _iter_file_all(self) -> Iterator[SampledFrame]:
        t0, t1 = self.window
        self.stats.mode = "sequential"
        keyframes = self._keyframe_times()
        iterator = None
        self._seek_enabled = len(keyframes) >= 2
        if self._seek_enabled and t0 > 0 and any(0 < kt <= t0 for kt in keyframes):
            landed = self._seek_to(t0)
            if landed is not None:
                iterator, first = landed
                iterator = _prepend(first, iterator) if first is not None else iterator
        if iterator is None:
            iterator = self._decode_from_here()
        count = 0
        last = None
        for decoded in iterator:
            last = decoded
            if decoded.time >= t1:
                break
            if decoded.time >= t0 - 1e-9:
                yield self._emit([count], decoded)
                count += 1
        else:
            if last is not None:
                self._check_truncation(last)
        if count == 0:
            raise VideoDecodeError(f"{self.source_name}: no decodable frames in [{t0}, {t1}) s")

    def _check_truncation(self, last: _Decoded) -> None:
        """The stream ended: complain when it ends well before the duration the file declares."""
        end = last.time + (last.duration or 0.0)
        declared = self.duration or 0.0
        step = last.duration or (1.0 / self._rate if self._rate else 0.0)
        tolerance = max(4 * step, 0.05 * declared)
        if declared - end > tolerance:
            raise VideoDecodeError(
                f"{self.source_name}: video data ends at {end:.3f} s but the file declares {declared:.3f} s; "
                "the file is truncated or corrupt"
            )

    def _emit(self, indices: Sequence[int], decoded: _Decoded) -> SampledFrame:
        # FFmpeg conceals some damage and only flags the frame; a flagged frame is not trusted.
        if getattr(decoded.frame, "is_corrupt", False):
            raise VideoDecodeError(
                f"{self.source_name}: the frame at {decoded.time:.3f} s is corrupt (damaged video data)"
            )
        return SampledFrame(tuple(indices), self._to_rgb(decoded.frame), float(decoded.time))

    def _to_rgb(self, frame) -> np.ndarray:
        """RGB uint8 (H, W, 3) as displayed: rotation metadata applied, resized to the clip's size."""
        rotation = getattr(frame, "rotation", 0) or 0
        quarter = round(rotation / 90) % 4  # counter-clockwise quarter turns
        if self._out_hw is None:
            shown = (frame.height, frame.width) if quarter % 2 == 0 else (frame.width, frame.height)
            self._out_hw = _output_hw(shown[0], shown[1], self.size)
        out_h, out_w = self._out_hw
        coded_h, coded_w = (out_h, out_w) if quarter % 2 == 0 else (out_w, out_h)
        try:
            # One scaler thread: swscale's thread pool costs more to set up per frame than it saves.
            image = frame.to_ndarray(format="rgb24", width=coded_w, height=coded_h, threads=1)
        except self._av.FFmpegError as exc:
            raise VideoDecodeError(f"{self.source_name}: cannot convert a frame to RGB ({_av_reason(exc)})") from exc
        if quarter:
            image = np.rot90(image, k=quarter)
        return np.ascontiguousarray(image)

    # -- collecting ------------------------------------------------------------------------------------

    def read(self) -> VideoClip:
        """Decode the planned frames into a :class:`VideoClip` (only the sampled frames are kept)."""
        count = self.num_frames
        frames: np.ndarray | None = None
        collected: list[np.ndarray] = []
        times = np.zeros(count or 0, dtype=np.float64)
        time_list: list[float] = []
        for sample in self:
            if count is None:
                collected.append(sample.image)
                time_list.append(sample.timestamp)
                continue
            if frames is None:
                frames = np.empty((count, *sample.image.shape), dtype=np.uint8)
            for k in sample.indices:
                frames[k] = sample.image
                times[k] = sample.timestamp
        if count is None:
            if not collected:
                raise VideoDecodeError(f"{self.source_name}: no frames in the requested window")
            frames = np.stack(collected)
            times = np.asarray(time_list, dtype=np.float64)
        if frames is None:
            raise VideoDecodeError(f"{self.source_name}: no frames in the requested window")
        return VideoClip(
            frames=torch.from_numpy(frames),
            timestamps=torch.from_numpy(times),
            fps=self.fps,
            duration=self.duration,
            source=self.source_name,
        )

    def close(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            finally:
                self._container = None

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a reader dropped half-way must not leak the file handle
        try:
            self.close()
        except Exception:
            pass


def _prepend(first: _Decoded, rest: Iterator[_Decoded]) -> Iterator[_Decoded]:
    yield first
    yield from rest


def _av_reason(exc: BaseException) -> str:
    reason = getattr(exc, "strerror", None) or str(exc)
    return str(reason)


def load_video(
    source: VideoSource,
    num_frames: int | None = 32,
    fps: float | None = None,
    start: float | None = None,
    end: float | None = None,
    *,
    size: int | tuple[int, int] | None = None,
    source_fps: float | None = None,
) -> VideoClip:
    """Decode and sample a video into a :class:`VideoClip` of uint8 RGB frames.

    Args:
        source: a path, ``bytes``, a binary file-like object, a numpy array or torch tensor of frames
            (``(T, H, W, 3)`` or ``(T, 3, H, W)``, uint8 or float in ``[0, 1]``), or a list of PIL images.
        num_frames: frames to return with ``fps=None``; the cap with ``fps=x``; ``None`` for no cap.
        fps: sample at this many frames per second (capped at ``num_frames``) instead of a fixed count.
        start, end: window in seconds from the first frame (defaults: whole video; ``end`` past the video
            is clamped). For arrays without ``source_fps`` the unit is one frame.
        size: resize the frames: an int makes the shorter side that long (aspect kept), ``(h, w)`` is exact.
        source_fps: frame rate of array / PIL input (files carry their own).

    Returns ``T`` frames at the segment centres of the window (see the module docstring for the rule);
    a video with fewer frames than ``T`` repeats its frames, and ``timestamps`` says which were used.
    Rotation metadata is applied. Raises :class:`VideoDecodeError` (a ``ValueError``) naming the source
    when it is missing, not a video, corrupt, truncated or has no video frames; ``ValueError`` for bad
    arguments; ``ImportError`` naming the ``video2param[video]`` extra when PyAV is needed but missing.
    """
    with VideoReader(source, num_frames, fps, start, end, size=size, source_fps=source_fps) as reader:
        return reader.read()
