"""Small test videos written with PyAV, and an oracle that reads them back.

Every frame carries its own index as a row of black/white blocks along the top (bit b of the index is
block b, least significant bit on the left) plus a coloured square that moves, so consecutive frames differ
and any decoded frame can be identified after lossy coding (8-pixel blocks survive H.264, VP9, AV1, MJPEG
and a GIF palette). Nothing here imports video2param: the tests compare the library against these helpers.
"""

from __future__ import annotations

import os
from fractions import Fraction
from typing import Sequence

import av
import numpy as np

WIDTH, HEIGHT = 64, 48
INDEX_BITS = 8
_COLOURS = np.array([[230, 30, 30], [30, 200, 30], [30, 30, 230], [230, 230, 30]], dtype=np.uint8)


def pattern_frame(index: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """The RGB frame (height, width, 3) uint8 that encodes ``index``."""
    if not 0 <= index < 2**INDEX_BITS:
        raise ValueError(f"index {index} does not fit in {INDEX_BITS} bits")
    frame = np.full((height, width, 3), 40, dtype=np.uint8)
    band = height // 3
    block = width // INDEX_BITS
    for bit in range(INDEX_BITS):
        value = 255 if (index >> bit) & 1 else 0
        frame[:band, bit * block : (bit + 1) * block] = value
    side = height // 3
    x = (index * 3) % (width - side)
    frame[band + 4 : band + 4 + side, x : x + side] = _COLOURS[index % len(_COLOURS)]
    return frame


def read_index(frame: np.ndarray) -> int:
    """Recover the index written by :func:`pattern_frame` from a decoded (possibly resized) frame."""
    frame = np.asarray(frame)
    height, width = frame.shape[:2]
    band = height / 3
    block = width / INDEX_BITS
    gray = frame.astype(np.float32).mean(axis=-1)
    index = 0
    for bit in range(INDEX_BITS):
        # Read the middle of each block, away from edges that codecs smear.
        y0, y1 = int(band * 0.25), max(int(band * 0.75), int(band * 0.25) + 1)
        x0 = int(bit * block + block * 0.25)
        x1 = max(int(bit * block + block * 0.75), x0 + 1)
        if gray[y0:y1, x0:x1].mean() > 127:
            index |= 1 << bit
    return index


def write_video(
    path: str | os.PathLike,
    codec: str = "libx264",
    num_frames: int = 32,
    fps: int = 24,
    *,
    width: int = WIDTH,
    height: int = HEIGHT,
    pix_fmt: str | None = None,
    container_format: str | None = None,
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
    rotation: int | None = None,
    times: Sequence[float] | None = None,
    first_index: int = 0,
) -> str:
    """Encode ``num_frames`` pattern frames with ``codec``; return the path.

    ``times`` (seconds, increasing) writes a variable-frame-rate stream with those presentation times
    (millisecond time base); ``rotation`` stores a display matrix (counter-clockwise degrees).
    """
    path = os.fspath(path)
    with av.open(path, "w", format=container_format, options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        if pix_fmt is not None:
            stream.pix_fmt = pix_fmt
        if options:
            stream.options = dict(options)
        if times is not None:
            stream.time_base = Fraction(1, 1000)
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        count = len(times) if times is not None else num_frames
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(pattern_frame(first_index + i, width, height), format="rgb24")
            if times is not None:
                frame.pts = round(times[i] * 1000)
                frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_mp4(path, num_frames: int = 32, fps: int = 24, **kw) -> str:
    """H.264 in MP4 (moov in front so garbling the payload leaves the header readable)."""
    kw.setdefault("options", {"preset": "ultrafast", "crf": "18"})
    kw.setdefault("container_options", {"movflags": "faststart"})
    kw.setdefault("pix_fmt", "yuv420p")
    return write_video(path, "libx264", num_frames, fps, **kw)


def write_webm(path, num_frames: int = 32, fps: int = 24, **kw) -> str:
    kw.setdefault("options", {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"})
    return write_video(path, "libvpx-vp9", num_frames, fps, **kw)


def write_mjpeg_avi(path, num_frames: int = 32, fps: int = 24, **kw) -> str:
    kw.setdefault("pix_fmt", "yuvj420p")
    kw.setdefault("options", {"qmin": "2", "qmax": "4"})
    return write_video(path, "mjpeg", num_frames, fps, **kw)


def write_gif(path, num_frames: int = 32, fps: int = 24, **kw) -> str:
    kw.setdefault("pix_fmt", "rgb8")
    return write_video(path, "gif", num_frames, fps, **kw)


def write_y4m(path, num_frames: int = 32, fps: int = 24, **kw) -> str:
    """Uncompressed YUV4MPEG2 (the raw format of many video tools); every frame is a keyframe, no index."""
    kw.setdefault("pix_fmt", "yuv420p")
    kw.setdefault("container_format", "yuv4mpegpipe")
    return write_video(path, "rawvideo", num_frames, fps, **kw)


AV1_ENCODERS = ("libaom-av1", "libsvtav1", "librav1e")


def av1_encoder() -> str | None:
    """The first AV1 encoder this PyAV build has (None when there is none)."""
    for name in AV1_ENCODERS:
        if name in av.codecs_available:
            return name
    return None


def write_av1(path, num_frames: int = 32, fps: int = 24, **kw) -> str:
    encoder = av1_encoder()
    if encoder is None:
        raise RuntimeError("no AV1 encoder in this PyAV build")
    # Some AV1 encoders (SVT-AV1) refuse frames smaller than 64 px on a side.
    kw.setdefault("width", 64)
    kw.setdefault("height", 64)
    kw.setdefault("pix_fmt", "yuv420p")
    if encoder == "libsvtav1":
        kw.setdefault("options", {"preset": "12", "crf": "20", "svtav1-params": "lp=1"})
    elif encoder == "libaom-av1":
        kw.setdefault("options", {"cpu-used": "8", "crf": "20"})
    return write_video(path, encoder, num_frames, fps, container_format="mp4", **kw)


def write_audio_only(path, seconds: float = 0.5, rate: int = 16000) -> str:
    """A PCM WAV file: a container with one audio stream and no video."""
    path = os.fspath(path)
    with av.open(path, "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="mono")
        samples = (np.sin(np.arange(int(seconds * rate)) * 0.05) * 10000).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_audio_with_cover(path, seconds: float = 0.5, rate: int = 16000) -> str:
    """An M4A file: AAC audio plus cover art, which FFmpeg shows as a video stream marked attached_pic."""
    path = os.fspath(path)
    with av.open(path, "w", format="mp4") as container:
        audio = container.add_stream("aac", rate=rate, layout="mono")
        cover = container.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = WIDTH, HEIGHT, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        for packet in cover.encode(av.VideoFrame.from_ndarray(pattern_frame(3), format="rgb24")):
            container.mux(packet)
        for packet in cover.encode():
            container.mux(packet)
        samples = (np.sin(np.arange(int(seconds * rate)) * 0.05) * 0.3).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in audio.encode(frame):
            container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
    return path


def write_no_frames(path) -> str:
    """An AVI file with a declared video stream but not a single packet."""
    path = os.fspath(path)
    with av.open(path, "w", format="avi") as container:
        stream = container.add_stream("mjpeg", rate=24)
        stream.width, stream.height = WIDTH, HEIGHT
        stream.pix_fmt = "yuvj420p"
        # Without a packet PyAV would never write the header; force it so the file has a video stream.
        container.start_encoding()
    return path


def decode_all(path: str | os.PathLike) -> list[tuple[float, int]]:
    """Oracle: (time in seconds from the stream start, pattern index) of every frame, by plain PyAV."""
    out = []
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        origin = stream.start_time or 0
        for frame in container.decode(stream):
            time = float((frame.pts - origin) * stream.time_base)
            out.append((time, read_index(frame.to_ndarray(format="rgb24"))))
    return out


def frame_on_screen(reference: list[tuple[float, int]], t: float) -> tuple[float, int]:
    """The reference frame displayed at time ``t``: the last one starting at or before ``t``."""
    chosen = reference[0]
    for entry in reference:
        if entry[0] <= t + 1e-9:
            chosen = entry
        else:
            break
    return chosen
