"""video2param.video.io: decoding, sampling by timestamp, sources, rotation and errors.

Every video is written by the test itself with PyAV (see tests/video_files.py); each frame carries its index,
so a sampled frame is checked against a brute-force oracle that decodes everything with plain PyAV.
"""

from __future__ import annotations

import faulthandler
import io
import re
import sys

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

import video_files as vf  # noqa: E402
from video2param.video.io import (  # noqa: E402
    DENSE_SAMPLING_RATIO,
    VideoClip,
    VideoDecodeError,
    VideoFileNotFoundError,
    VideoPermissionError,
    VideoReader,
    load_video,
    sample_times,
)

FPS = 24


@pytest.fixture(autouse=True)
def no_hang():
    """A decoder that hangs kills the test process with a traceback instead of blocking CI forever."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _indices(clip: VideoClip) -> list[int]:
    return [vf.read_index(frame) for frame in clip.frames.numpy()]


def _expected(reference, times) -> tuple[list[int], list[float]]:
    chosen = [vf.frame_on_screen(reference, t) for t in times]
    return [c[1] for c in chosen], [c[0] for c in chosen]


def _assert_matches_oracle(path, clip: VideoClip, t0: float, t1: float) -> None:
    reference = vf.decode_all(path)
    n = clip.num_frames
    targets = t0 + (np.arange(n) + 0.5) * (t1 - t0) / n
    want_idx, want_ts = _expected(reference, targets)
    assert _indices(clip) == want_idx
    np.testing.assert_allclose(clip.timestamps.numpy(), want_ts, atol=1e-6)


WRITERS = {
    "mp4-h264": (vf.write_mp4, "mp4"),
    "webm-vp9": (vf.write_webm, "webm"),
    "avi-mjpeg": (vf.write_mjpeg_avi, "avi"),
    "gif": (vf.write_gif, "gif"),
    "mp4-av1": (vf.write_av1, "mp4"),
    "y4m": (vf.write_y4m, "y4m"),
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_each_format_samples_the_frame_on_screen(tmp_path, kind):
    if kind == "mp4-av1" and vf.av1_encoder() is None:
        pytest.skip(f"this PyAV build has none of the AV1 encoders {vf.AV1_ENCODERS}")
    writer, ext = WRITERS[kind]
    path = writer(tmp_path / f"clip.{ext}", 40, FPS)
    clip = load_video(path, num_frames=8)
    assert clip.frames.dtype == torch.uint8 and clip.frames.shape[0] == 8 and clip.frames.shape[-1] == 3
    assert clip.timestamps.dtype == torch.float64
    assert clip.source == str(path)
    assert clip.duration == pytest.approx(40 / FPS, abs=0.02)
    assert clip.fps == pytest.approx(FPS, rel=0.05)
    _assert_matches_oracle(path, clip, 0.0, clip.duration)
    # The rule, spelled out for a constant-rate file: segment centres, frame on screen.
    if kind != "gif":  # GIF stores times in 1/100 s, so its frames start a little off the 24 fps grid
        want = [int(((k + 0.5) * (40 / FPS) / 8) * FPS) for k in range(8)]
        assert _indices(clip) == want


def test_variable_frame_rate_uses_true_timestamps(tmp_path):
    times = [0.0, 0.04, 0.05, 0.2, 0.25, 0.5, 0.9, 0.95, 1.0, 1.5]
    path = vf.write_mp4(tmp_path / "vfr.mp4", times=times)
    clip = load_video(path, num_frames=6)
    _assert_matches_oracle(path, clip, 0.0, clip.duration)
    # Every returned timestamp is one of the frames' real presentation times, and matches its content.
    for ts, idx in zip(clip.timestamps.tolist(), _indices(clip)):
        assert ts == pytest.approx(times[idx], abs=1e-6)


def _keyframed_mp4(path, num_frames=120):
    # A keyframe every 10 frames, with B-frames so presentation and decoding order differ.
    return vf.write_mp4(
        path,
        num_frames,
        FPS,
        options={"preset": "veryfast", "crf": "18", "x264-params": "keyint=10:min-keyint=10:scenecut=0:bframes=2"},
    )


def test_sparse_sampling_seeks_instead_of_decoding_everything(tmp_path):
    path = _keyframed_mp4(tmp_path / "long.mp4")
    with VideoReader(path, num_frames=6) as reader:
        clip = reader.read()
    assert reader.stats.mode == "seek"
    assert reader.stats.seeks >= 3
    assert reader.stats.frames_decoded < 120 // 2
    _assert_matches_oracle(path, clip, 0.0, clip.duration)


def test_dense_sampling_is_one_sequential_pass(tmp_path):
    path = _keyframed_mp4(tmp_path / "long.mp4")
    count = int(120 * DENSE_SAMPLING_RATIO) + 10
    with VideoReader(path, num_frames=count) as reader:
        clip = reader.read()
    assert reader.stats.mode == "sequential" and reader.stats.seeks == 0
    _assert_matches_oracle(path, clip, 0.0, clip.duration)


def test_window_seeks_to_start_and_stays_inside(tmp_path):
    path = _keyframed_mp4(tmp_path / "long.mp4")
    with VideoReader(path, num_frames=40, start=3.0, end=4.5) as reader:
        clip = reader.read()
    assert reader.stats.seeks >= 1  # dense inside the window, but it did not decode from 0 s
    assert reader.stats.frames_decoded < 120 - 3 * FPS + 10
    _assert_matches_oracle(path, clip, 3.0, 4.5)
    assert clip.timestamps.min() >= 3.0 - 1 / FPS and clip.timestamps.max() < 4.5


def test_end_past_the_video_is_clamped_and_start_past_it_is_an_error(tmp_path):
    path = vf.write_mp4(tmp_path / "c.mp4", 24, FPS)
    clip = load_video(path, num_frames=4, start=0.5, end=100.0)
    _assert_matches_oracle(path, clip, 0.5, 1.0)
    with pytest.raises(ValueError, match="beyond the end"):
        load_video(path, num_frames=4, start=5.0)


def test_short_video_repeats_the_nearest_frames(tmp_path):
    path = vf.write_mp4(tmp_path / "short.mp4", 5, FPS)
    clip = load_video(path, num_frames=12)
    assert clip.num_frames == 12
    idx = _indices(clip)
    assert sorted(set(idx)) == [0, 1, 2, 3, 4]
    assert idx == sorted(idx)
    # Timestamps tell the truth: a repeated frame repeats its own time.
    np.testing.assert_allclose(clip.timestamps.numpy(), np.array(idx) / FPS, atol=1e-6)
    # Streaming yields each decoded frame once, with all the positions it fills.
    with VideoReader(path, num_frames=12) as reader:
        samples = list(reader)
    assert len(samples) == 5
    assert sorted(k for s in samples for k in s.indices) == list(range(12))


def test_fps_sampling_rule(tmp_path):
    path = vf.write_mp4(tmp_path / "two_seconds.mp4", 48, FPS)
    clip = load_video(path, num_frames=32, fps=4)  # 2 s at 4 frames/s = 8 frames, under the cap
    assert clip.num_frames == 8
    np.testing.assert_allclose(clip.timestamps.numpy(), [int((k + 0.5) / 4 * FPS) / FPS for k in range(8)])
    assert load_video(path, num_frames=10, fps=100).num_frames == 10  # capped
    assert load_video(path, num_frames=None, fps=6).num_frames == 12  # no cap
    assert load_video(path, num_frames=None, fps=0.1).num_frames == 1  # at least one


def test_every_frame_when_uncapped(tmp_path):
    path = _keyframed_mp4(tmp_path / "long.mp4", 60)
    assert _indices(load_video(path, num_frames=None)) == list(range(60))
    clip = load_video(path, num_frames=None, start=1.0, end=1.5)
    assert _indices(clip) == list(range(24, 36))


def test_sample_times_is_segment_centres():
    np.testing.assert_allclose(sample_times(0.0, 2.0, 4, None), [0.25, 0.75, 1.25, 1.75])
    np.testing.assert_allclose(sample_times(1.0, 3.0, 8, 2.0), [1.25, 1.75, 2.25, 2.75])


def test_size_resizes_at_decode_time(tmp_path):
    path = vf.write_mp4(tmp_path / "c.mp4", 16, FPS)
    clip = load_video(path, num_frames=4, size=24)  # shorter side 24, aspect kept: 48x64 -> 24x32
    assert tuple(clip.frames.shape[1:]) == (24, 32, 3)
    assert _indices(clip) == [2, 6, 10, 14]
    assert tuple(load_video(path, num_frames=2, size=(40, 30)).frames.shape[1:3]) == (40, 30)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_metadata_is_honoured(tmp_path, rotation):
    plain = load_video(vf.write_mp4(tmp_path / "plain.mp4", 8, FPS), num_frames=4)
    rotated_path = vf.write_mp4(tmp_path / "rotated.mp4", 8, FPS, rotation=rotation)
    with av.open(str(rotated_path)) as container:  # the file really carries the display matrix
        assert next(container.decode(video=0)).rotation % 360 == rotation % 360
    rotated = load_video(rotated_path, num_frames=4)
    expected = np.rot90(plain.frames.numpy(), k=rotation // 90, axes=(1, 2))
    assert rotated.frames.shape == expected.shape
    diff = np.abs(rotated.frames.numpy().astype(int) - expected.astype(int))
    assert diff.mean() < 2.0
    # size refers to the displayed picture, after rotation.
    assert tuple(load_video(rotated_path, num_frames=2, size=(30, 20)).frames.shape[1:3]) == (30, 20)


# ------------------------------------------------------------------------------------------- sources


def test_file_like_and_bytes_sources(tmp_path):
    path = vf.write_webm(tmp_path / "c.webm", 16, FPS)
    reference = load_video(path, num_frames=4)
    data = path_bytes = open(path, "rb").read()
    from_bytesio = load_video(io.BytesIO(data), num_frames=4)
    assert from_bytesio.source == "<file-like>"
    with open(path, "rb") as handle:
        from_handle = load_video(handle, num_frames=4)
    assert str(path) in from_handle.source
    from_bytes = load_video(path_bytes, num_frames=4)
    for clip in (from_bytesio, from_handle, from_bytes):
        assert torch.equal(clip.frames, reference.frames)
        assert torch.equal(clip.timestamps, reference.timestamps)


def _pattern_array(n=10) -> np.ndarray:
    return np.stack([vf.pattern_frame(i) for i in range(n)])


def test_array_sources_agree():
    frames = _pattern_array(10)
    from PIL import Image

    sources = {
        "<ndarray>": frames,
        "<tensor>": torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255,  # (T, 3, H, W) in [0, 1]
        "<PIL images>": [Image.fromarray(f) for f in frames],
    }
    for name, source in sources.items():
        clip = load_video(source, num_frames=5)
        assert clip.source == name
        assert torch.equal(clip.frames, torch.from_numpy(frames[[1, 3, 5, 7, 9]]))
        # Without a frame rate, time is counted in frames.
        assert clip.timestamps.tolist() == [1.0, 3.0, 5.0, 7.0, 9.0]
        assert clip.fps is None and clip.duration is None


def test_array_with_source_fps_and_window():
    frames = _pattern_array(20)
    clip = load_video(frames, num_frames=None, fps=5, source_fps=10.0)  # 2 s at 5 frames/s
    assert clip.fps == 10.0 and clip.duration == 2.0
    assert _indices(clip) == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19]
    assert _indices(load_video(frames, num_frames=None, start=5, end=8)) == [5, 6, 7]
    short = load_video(frames[:3], num_frames=6)
    assert _indices(short) == [0, 0, 1, 1, 2, 2]
    resized = load_video(frames, num_frames=2, size=(24, 32))
    assert tuple(resized.frames.shape) == (2, 24, 32, 3) and _indices(resized) == [5, 15]


def test_array_source_errors():
    frames = _pattern_array(4)
    with pytest.raises(ValueError, match="4 dimensions"):
        load_video(frames[0])
    with pytest.raises(ValueError, match="3 colour channels"):
        load_video(np.zeros((2, 8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_video(torch.full((2, 8, 8, 3), 2.0))
    with pytest.raises(ValueError, match="dtype"):
        load_video(frames.astype(np.int16))
    with pytest.raises(VideoDecodeError, match="zero frames"):
        load_video(np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(VideoDecodeError, match="empty"):
        load_video([])
    with pytest.raises(ValueError, match="PIL"):
        load_video([1, 2, 3])
    from PIL import Image

    with pytest.raises(ValueError, match="different sizes"):
        load_video([Image.new("RGB", (8, 8)), Image.new("RGB", (9, 8))])
    with pytest.raises(ValueError, match="source_fps"):
        load_video(frames, fps=2.0)
    with pytest.raises(ValueError, match="source_fps"):
        load_video(frames, source_fps=-1.0)
    with pytest.raises(ValueError, match="unsupported video source"):
        load_video(12345)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_frames": 0}, "num_frames"),
        ({"num_frames": -3}, "num_frames"),
        ({"num_frames": 2.5}, "num_frames"),
        ({"num_frames": True}, "num_frames"),
        ({"fps": 0}, "fps"),
        ({"fps": -1.0}, "fps"),
        ({"fps": float("nan")}, "fps"),
        ({"start": -1.0}, "start"),
        ({"end": float("inf")}, "end"),
        ({"start": 1.0, "end": 1.0}, "before end"),
        ({"start": 2.0, "end": 1.0}, "before end"),
        ({"size": 0}, "size"),
        ({"size": (0, 4)}, "size"),
        ({"size": "big"}, "size"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_video(_pattern_array(4), **kwargs)
    # Arguments are checked before the file is touched: even a missing file reports the argument.
    with pytest.raises(ValueError, match=message):
        load_video(tmp_path / "missing.mp4", **kwargs)


# -------------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(VideoDecodeError, match="nope.mp4: no such file") as info:
        load_video(missing)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, VideoFileNotFoundError)


def test_directory_and_empty_file(tmp_path):
    with pytest.raises(VideoDecodeError, match="is a directory"):
        load_video(tmp_path)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoDecodeError, match="empty.mp4: the file is empty"):
        load_video(empty)


def test_symlinks_and_special_files_get_accurate_messages(tmp_path):
    import os

    loop_a, loop_b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    with pytest.raises(VideoDecodeError, match=r"a.mp4: cannot be opened: too many levels of symbolic links") as info:
        load_video(loop_a)
    assert not isinstance(info.value, FileNotFoundError)  # the file is not missing: the link goes round in circles
    dangling = tmp_path / "dangling.mp4"
    dangling.symlink_to(tmp_path / "gone.mp4")
    with pytest.raises(VideoFileNotFoundError, match=r"dangling.mp4: is a broken symbolic link .*gone.mp4"):
        load_video(dangling)
    with pytest.raises(VideoFileNotFoundError, match=r"no such file \(the directory .*nowhere' does not exist\)"):
        load_video(tmp_path / "nowhere" / "clip.mp4")
    (tmp_path / "file").write_text("x")
    with pytest.raises(VideoDecodeError, match="a component of the path is a file, not a directory"):
        load_video(tmp_path / "file" / "clip.mp4")
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    with pytest.raises(VideoDecodeError, match=r"pipe.mp4: is a named pipe \(FIFO\), not a regular file"):
        load_video(fifo)  # (opening it would block forever)


def test_unreadable_file_is_a_permission_error(tmp_path):
    import os

    locked = vf.write_mp4(tmp_path / "locked.mp4", 4, FPS)
    os.chmod(locked, 0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running with privileges that ignore file permissions (root)")
        with pytest.raises(VideoPermissionError, match="locked.mp4: permission denied"):
            load_video(locked)
    finally:
        os.chmod(locked, 0o644)


def test_permission_denied_is_reported_as_such(tmp_path, monkeypatch):
    import errno

    import video2param.video.io as video_io

    path = vf.write_mp4(tmp_path / "locked.mp4", 4, FPS)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(video_io, "open", denied, raising=False)  # as for a file of another user, even as root
    with pytest.raises(VideoPermissionError, match="locked.mp4: permission denied") as info:
        load_video(path)
    assert isinstance(info.value, PermissionError) and isinstance(info.value, VideoDecodeError)


def test_y4m_decodes_from_a_path_and_from_bytes(tmp_path):
    path = vf.write_y4m(tmp_path / "raw.y4m", 30, FPS)
    from_path = load_video(path, num_frames=5)
    from_bytes = load_video(open(path, "rb").read(), num_frames=5)
    assert torch.equal(from_path.frames, from_bytes.frames) and _indices(from_path) == [3, 9, 15, 21, 27]


@pytest.mark.parametrize(
    "header, message",
    [
        (b"YUV4MPEG2 W0 H0 F24:1", "frame size 0x0 is not a valid picture size"),
        (b"YUV4MPEG2 W100000 H100000 F24:1", "frame size 100000x100000 is not a valid picture size"),
        (b"YUV4MPEG2 F24:1", r"no frame size \(W and H are required\)"),
    ],
)
def test_y4m_with_a_bad_header_says_so(tmp_path, header, message):
    path = tmp_path / "bad.y4m"
    path.write_bytes(header + b"\n" + (b"FRAME\n" + bytes(64 * 48 * 3 // 2)) * 3)
    with pytest.raises(VideoDecodeError) as info:
        load_video(path)
    text = str(info.value)
    assert "bad.y4m: not a readable video file (invalid YUV4MPEG2 header: " in text
    assert re.search(message, text) and "Device or resource busy" not in text


def test_text_file_renamed_mp4(tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("these are my notes, not a video\n" * 20)
    with pytest.raises(VideoDecodeError, match="notes.mp4: not a readable video file"):
        load_video(fake)


@pytest.mark.parametrize("keep", [200, 0.5])
@pytest.mark.parametrize("kind", ["mp4", "webm", "avi"])
def test_truncated_file(tmp_path, kind, keep):
    writer = {"mp4": vf.write_mp4, "webm": vf.write_webm, "avi": vf.write_mjpeg_avi}[kind]
    data = open(writer(tmp_path / f"full.{kind}", 48, FPS), "rb").read()
    cut = tmp_path / f"cut.{kind}"
    cut.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(VideoDecodeError, match=f"cut.{kind}: ") as info:
        load_video(cut, num_frames=8)
    assert any(word in str(info.value) for word in ("truncated", "corrupt", "not a readable", "no frames"))


@pytest.mark.parametrize("where", [0.2, 0.4, 0.6, 0.8])
def test_garbled_bytes_in_the_middle(tmp_path, where):
    data = bytearray(open(vf.write_mp4(tmp_path / "ok.mp4", 48, FPS), "rb").read())
    length = len(data) // 5
    start = int(len(data) * where)
    data[start : start + length] = np.random.default_rng(0).integers(0, 256, length, dtype=np.uint8).tobytes()
    bad = tmp_path / "garbled.mp4"
    bad.write_bytes(bytes(data))
    with pytest.raises(VideoDecodeError, match="garbled.mp4: .*(corrupt|truncated)"):
        load_video(bad, num_frames=8)


def test_video_stream_without_frames(tmp_path):
    path = vf.write_no_frames(tmp_path / "empty_stream.avi")
    with av.open(str(path)) as container:  # the fixture really is a video stream with no packets
        assert len(container.streams.video) == 1
    with pytest.raises(VideoDecodeError, match="empty_stream.avi: .*no frames"):
        load_video(path)


def test_audio_only_file(tmp_path):
    path = vf.write_audio_only(tmp_path / "speech.wav")
    with pytest.raises(VideoDecodeError, match="speech.wav: has no video stream \\(audio-only"):
        load_video(path)


def test_cover_art_is_not_video(tmp_path):
    path = vf.write_audio_with_cover(tmp_path / "song.m4a")
    with av.open(str(path)) as container:  # FFmpeg does list the cover as a video stream
        assert len(container.streams.video) == 1
    with pytest.raises(VideoDecodeError, match="song.m4a: has no video stream \\(audio-only"):
        load_video(path)


def test_missing_pyav_gives_install_hint(tmp_path, monkeypatch):
    path = vf.write_mp4(tmp_path / "c.mp4", 4, FPS)
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` fail
    with pytest.raises(ImportError, match=r"video2param\[video\]"):
        load_video(path)
    assert load_video(_pattern_array(3), num_frames=3).num_frames == 3  # arrays do not need PyAV


def test_video_clip_validates_its_fields():
    with pytest.raises(ValueError, match="uint8"):
        VideoClip(frames=torch.zeros(2, 4, 4, 3), timestamps=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="timestamps"):
        VideoClip(frames=torch.zeros(2, 4, 4, 3, dtype=torch.uint8), timestamps=torch.zeros(3))
