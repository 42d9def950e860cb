"""video2param.video.cache: content-keyed safetensors feature cache; damaged entries are recomputed; entries follow
the encoder's weights; concurrent readers and writers never lose a valid entry."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import CLIPVisionConfig, CLIPVisionModel

from video2param.video.cache import FeatureCache
from video2param.video.encoder import VisionEncoder

av = pytest.importorskip("av")
import video_files as vf  # noqa: E402

TOWER = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
SETTINGS = {"num_frames": 4, "fps": None, "start": None, "end": None, "size": None}


@pytest.fixture(scope="module")
def encoder() -> VisionEncoder:
    torch.manual_seed(0)
    return VisionEncoder(CLIPVisionModel(CLIPVisionConfig(**TOWER)))


@pytest.fixture
def video(tmp_path):
    return vf.write_mp4(tmp_path / "clip.mp4", 12, 24)


class Counter:
    """compute_fn that counts its calls and returns a fixed entry."""

    def __init__(self, value: float = 1.0):
        self.calls = 0
        self.value = value

    def __call__(self):
        self.calls += 1
        return {"features": torch.full((2, 3), self.value), "timestamps": torch.tensor([0.0, 0.5], dtype=torch.float64),
                "fps": 24.0, "duration": None, "note": "x"}


def test_hit_after_miss_returns_the_same_entry(tmp_path, video):
    cache = FeatureCache(tmp_path / "cache")
    compute = Counter()
    first = cache.get_or_compute(video, SETTINGS, "enc-A", compute)
    second = cache.get_or_compute(video, SETTINGS, "enc-A", compute)
    assert compute.calls == 1 and (cache.misses, cache.hits) == (1, 1)
    assert torch.equal(second["features"], first["features"])
    assert second["timestamps"].dtype == torch.float64
    assert (second["fps"], second["duration"], second["note"]) == (24.0, None, "x")
    # A fresh cache object on the same directory (another process, later) hits too.
    again = FeatureCache(tmp_path / "cache")
    again.get_or_compute(video, SETTINGS, "enc-A", compute)
    assert compute.calls == 1 and again.hits == 1


def test_key_is_by_content_not_by_path(tmp_path, video):
    cache = FeatureCache(tmp_path / "cache")
    copy = tmp_path / "elsewhere.mp4"
    copy.write_bytes(open(video, "rb").read())
    assert cache.key(copy, SETTINGS, "enc") == cache.key(video, SETTINGS, "enc")


def test_changed_file_setting_or_encoder_misses(tmp_path, video):
    cache = FeatureCache(tmp_path / "cache")
    compute = Counter()
    cache.get_or_compute(video, SETTINGS, "enc-A", compute)
    cache.get_or_compute(video, {**SETTINGS, "num_frames": 8}, "enc-A", compute)
    cache.get_or_compute(video, {**SETTINGS, "start": 0.1}, "enc-A", compute)
    cache.get_or_compute(video, SETTINGS, "enc-B", compute)
    assert compute.calls == 4
    # Rewrite the file in place with other frames: same path, new content.
    stat = os.stat(video)
    vf.write_mp4(video, 12, 24, first_index=50)
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    cache.get_or_compute(video, SETTINGS, "enc-A", compute)
    assert compute.calls == 5 and cache.hits == 0


@pytest.mark.parametrize("damage", ["truncate", "garble", "foreign", "empty"])
def test_corrupt_entry_is_recomputed_not_trusted(tmp_path, video, damage, caplog):
    cache = FeatureCache(tmp_path / "cache")
    cache.get_or_compute(video, SETTINGS, "enc", Counter(1.0))
    key = cache.key(video, SETTINGS, "enc")
    path = cache.entry_path(key)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garble":
        data[-4:] = b"\xff\xff\xff\x7f"  # tensor bytes: the header still parses, the checksum does not match
    elif damage == "foreign":  # a valid entry copied under the wrong key
        other = cache.put("0" * 64, {"features": torch.zeros(2, 3)})
        data = bytearray(other.read_bytes())
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    fresh = Counter(2.0)
    with caplog.at_level("WARNING", logger="video2param.video.cache"):
        entry = cache.get_or_compute(video, SETTINGS, "enc", fresh)
    assert fresh.calls == 1 and cache.corrupt == 1
    reason = {"garble": "checksum mismatch", "foreign": "another key"}.get(damage, "corrupt")
    assert reason in caplog.text
    assert torch.equal(entry["features"], torch.full((2, 3), 2.0))
    # The recomputed entry replaced the damaged one and is trusted again.
    assert torch.equal(cache.get(key)["features"], torch.full((2, 3), 2.0))


def test_entry_is_safetensors_with_description(tmp_path, video):
    cache = FeatureCache(tmp_path / "cache")
    cache.get_or_compute(video, SETTINGS, "enc", Counter())
    path = cache.entry_path(cache.key(video, SETTINGS, "enc"))
    assert path.suffix == ".safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        assert set(handle.keys()) == {"features", "timestamps"}
    description = json.loads(metadata["description"])
    assert description["source"] == str(video) and description["encoder"] == "enc"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    (tmp_path / "probe").write_text("x")  # entries are as readable as any file (a cache may be shared)
    assert path.stat().st_mode & 0o7777 == (tmp_path / "probe").stat().st_mode & 0o7777
    assert cache.clear() == 1 and cache.get(cache.key(video, SETTINGS, "enc")) is None


def test_bad_inputs(tmp_path, video):
    cache = FeatureCache(tmp_path / "cache")
    with pytest.raises(ValueError, match="JSON scalar"):
        cache.put("k" * 64, {"features": [1, 2, 3]})
    with pytest.raises(ValueError, match="identity"):
        cache.key(video, SETTINGS, object())
    with pytest.raises(ValueError, match="cannot be part of a cache key"):
        cache.key(video, {"num_frames": object()}, "enc")
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        cache.key(tmp_path / "missing.mp4", SETTINGS, "enc")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        FeatureCache(tmp_path / "file")


def test_encoder_encode_video_uses_the_cache(tmp_path, video, encoder):
    cache = FeatureCache(tmp_path / "cache")
    computed = encoder.encode_video(video, num_frames=6, cache=cache)
    cached = encoder.encode_video(video, num_frames=6, cache=cache)
    assert (cache.misses, cache.hits) == (1, 1)
    torch.testing.assert_close(cached.features, computed.features)
    torch.testing.assert_close(cached.timestamps, computed.timestamps)
    assert cached.fps == computed.fps and cached.duration == computed.duration
    encoder.encode_video(video, num_frames=7, cache=cache)  # another sampling setting
    assert cache.misses == 2
    torch.manual_seed(1)
    other = VisionEncoder(CLIPVisionModel(CLIPVisionConfig(**TOWER)))
    other.encode_video(video, num_frames=6, cache=cache)  # another encoder (weights differ)
    assert cache.misses == 3


def test_a_read_never_deletes_an_entry_that_a_writer_just_put(tmp_path, video, monkeypatch):
    reader, writer = FeatureCache(tmp_path / "cache"), FeatureCache(tmp_path / "cache")
    key = reader.key(video, SETTINGS, "enc")
    reader.entry_path(key).parent.mkdir(parents=True)
    reader.entry_path(key).write_bytes(b"half-written by a crashed tool")
    real_read = FeatureCache._read

    def read_then_lose_the_race(self, path, key):
        writer.put(key, Counter(3.0)())  # another process renames a valid entry into place meanwhile
        raise ValueError("truncated header")  # ... while this read was looking at the damaged one

    monkeypatch.setattr(FeatureCache, "_read", read_then_lose_the_race)
    assert reader.get(key) is None and reader.corrupt == 1
    monkeypatch.setattr(FeatureCache, "_read", real_read)
    assert torch.equal(reader.get(key)["features"], torch.full((2, 3), 3.0))  # the writer's entry survived


def test_concurrent_readers_and_writers_see_whole_entries(tmp_path, video):
    import threading

    key = FeatureCache(tmp_path / "cache").key(video, SETTINGS, "enc")
    big = {"features": torch.randn(64, 49, 64), "timestamps": torch.arange(64, dtype=torch.float64)}
    stop = threading.Event()
    FeatureCache(tmp_path / "cache").put(key, big)

    def write() -> None:
        writer = FeatureCache(tmp_path / "cache")
        while not stop.is_set():
            writer.put(key, big)

    thread = threading.Thread(target=write)
    thread.start()
    reader = FeatureCache(tmp_path / "cache")
    try:
        seen = [reader.get(key) for _ in range(200)]
    finally:
        stop.set()
        thread.join(30)
    assert reader.corrupt == 0
    assert all(entry is not None and torch.equal(entry["features"], big["features"]) for entry in seen)


def _fresh_encoder(seed: int = 0) -> VisionEncoder:
    torch.manual_seed(seed)
    return VisionEncoder(CLIPVisionModel(CLIPVisionConfig(**TOWER)))


@pytest.mark.parametrize("change", ["no_grad add_", "data copy_", "load_state_dict", "to dtype"])
def test_cached_features_follow_weights_changed_in_place(tmp_path, video, change):
    encoder = _fresh_encoder()
    cache = FeatureCache(tmp_path / "cache")
    before = encoder.encode_video(video, num_frames=4, cache=cache).features
    identity = encoder.identity
    weight = next(p for n, p in encoder.tower.named_parameters() if n.endswith("layers.0.mlp.fc1.weight"))
    if change == "no_grad add_":
        with torch.no_grad():
            weight.add_(0.5)
    elif change == "data copy_":  # invisible to the version counter
        weight.data.copy_(torch.randn_like(weight))
    elif change == "load_state_dict":
        encoder.tower.load_state_dict(_fresh_encoder(seed=1).tower.state_dict())
    else:
        encoder.tower.to(torch.float64)
    assert encoder.identity != identity
    after = encoder.encode_video(video, num_frames=4, cache=cache)
    assert cache.misses == 2 and cache.hits == 0
    uncached = encoder.encode_video(video, num_frames=4)
    torch.testing.assert_close(after.features, uncached.features)
    assert not torch.allclose(after.features.float(), before.float())
    encoder.encode_video(video, num_frames=4, cache=cache)
    assert cache.hits == 1  # unchanged weights: the identity (and the key) is stable again


def test_encoder_uses_its_own_cache_by_default(tmp_path, video):
    cache = FeatureCache(tmp_path / "cache")
    encoder = VisionEncoder(CLIPVisionModel(CLIPVisionConfig(**TOWER)), cache=cache)
    encoder.encode_video(video, num_frames=4)
    encoder.encode_video(video, num_frames=4)
    assert (cache.misses, cache.hits) == (1, 1)
    with pytest.raises(ValueError, match="cache must be a FeatureCache"):
        VisionEncoder(CLIPVisionModel(CLIPVisionConfig(**TOWER)), cache=str(tmp_path))
    with pytest.raises(ValueError, match="num_frames must be a positive integer"):
        encoder.encode_video(video, num_frames=0)  # checked before the file is hashed for the key
