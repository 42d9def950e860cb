"""`videos=` of VideoModel: file paths, clips, pixel frames and features all reach the same features."""

import pytest
import torch
from conftest import encode
from transformers import CLIPVisionConfig, CLIPVisionModel
from video_files import write_mp4

from video2param import load_video, wrap_model


@pytest.fixture
def tower():
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4)).eval()


def test_paths_clips_frames_and_features_agree(tmp_path, tower, llama, tokenizer):
    vm = wrap_model(llama, method="llava", vision=tower, tokenizer=tokenizer, num_frames=4)
    assert vm.config.vision_hidden_size == 32
    path = write_mp4(tmp_path / "a.mp4", num_frames=12, width=32, height=32)
    clip = load_video(path, num_frames=4)
    ids, mask = encode(tokenizer, ["<video> what colour ?"])
    from_path = vm(input_ids=ids, attention_mask=mask, videos=[path]).logits
    from_clip = vm(input_ids=ids, attention_mask=mask, videos=[clip]).logits
    frames = clip.frames.permute(0, 3, 1, 2).float().div(255)[None]  # (1, T, 3, H, W) in [0, 1]
    from_frames = vm(input_ids=ids, attention_mask=mask, videos=frames).logits
    feats = vm.vision.encode_frames(clip.frames)[None]
    from_feats = vm(input_ids=ids, attention_mask=mask, videos=feats).logits
    assert torch.equal(from_path, from_clip)
    assert torch.allclose(from_frames, from_feats, atol=1e-4)
    assert torch.allclose(from_clip, from_feats, atol=1e-4)


def test_paths_of_different_lengths_get_a_frame_mask(tmp_path, tower, llama, tokenizer):
    vm = wrap_model(llama, method="vipe", vision=tower, tokenizer=tokenizer, num_frames=4, rank=4, hidden_dim=32,
                    num_heads=4, depth=1)
    long_clip = load_video(write_mp4(tmp_path / "a.mp4", num_frames=12, width=32, height=32), num_frames=4)
    short_clip = load_video(write_mp4(tmp_path / "b.mp4", num_frames=12, width=32, height=32), num_frames=2)
    inputs = vm.prepare_videos([long_clip, short_clip])
    assert inputs.features.shape[:2] == (2, 4)
    assert inputs.frame_mask.tolist() == [[True] * 4, [True, True, False, False]]


def test_bad_video_entries(tmp_path, tower, llama, tokenizer):
    from video2param import VideoDecodeError

    vm = wrap_model(llama, method="llava", vision=tower, tokenizer=tokenizer, num_frames=4)
    ids, mask = encode(tokenizer, ["<video> a ?"])
    with pytest.raises(VideoDecodeError, match="nope.mp4"):
        vm(input_ids=ids, attention_mask=mask, videos=[tmp_path / "nope.mp4"])
    with pytest.raises(ValueError, match=r"videos\[0\]: expected a path, a VideoClip or a tensor"):
        vm(input_ids=ids, attention_mask=mask, videos=[42])
    with pytest.raises(ValueError, match="empty list"):
        vm(input_ids=ids, attention_mask=mask, videos=[])


def test_files_and_clips_go_through_the_encoders_streaming_cached_path(tmp_path, tower, llama, tokenizer, monkeypatch):
    from video2param import VisionEncoder
    from video2param.video import FeatureCache

    cache = FeatureCache(tmp_path / "cache")
    encoder = VisionEncoder(tower, cache=cache)
    vm = wrap_model(llama, method="llava", vision=encoder, tokenizer=tokenizer, num_frames=4)
    assert vm.vision is encoder
    path = write_mp4(tmp_path / "a.mp4", num_frames=12, width=32, height=32)
    first = vm.prepare_videos([path]).features
    # The second time the file is not decoded at all: the features come from the encoder's cache.
    import video2param.video.encoder as encoder_module

    monkeypatch.setattr(encoder_module, "VideoReader", None)
    again = vm.prepare_videos([path]).features
    assert (cache.misses, cache.hits) == (1, 1) and torch.equal(first, again)
    monkeypatch.undo()
    direct = encoder.encode_video(path, num_frames=4).features  # the encoder alone: same features, same entry
    assert torch.equal(direct.to(first.dtype), first[0]) and cache.hits == 2
    from_bytes = vm.prepare_videos([open(path, "rb").read()]).features  # bytes stream through the same path
    assert torch.allclose(from_bytes, first, atol=1e-5)


@pytest.mark.parametrize(
    "videos, message",
    [
        ([], "empty list"),
        ((), "empty list"),
        (torch.empty(0, 4, 4, 16), r"empty batch \(shape \(0, 4, 4, 16\): 0 videos"),
        (torch.empty(1, 0, 4, 16), r"empty batch \(shape \(1, 0, 4, 16\): 1 videos of 0 frames"),
        (torch.empty(1, 4, 0, 16), r"empty features \(shape \(1, 4, 0, 16\)"),
        (torch.empty(0, 4, 3, 8, 8), "empty batch"),
        (torch.empty(1, 4, 3, 0, 8), r"empty pixel frames"),
        ([torch.empty(0, 4, 16)], r"videos\[0\]: empty features"),
        ([torch.randn(4, 4, 16), torch.empty(4, 0, 16)], r"videos\[1\]: empty features"),
        ([torch.empty(0, 3, 8, 8)], r"videos\[0\]: zero frames"),
    ],
)
def test_empty_inputs_are_refused_clearly(tower, videos, message):
    from video2param import VisionEncoder
    from video2param.videos import prepare_video_inputs

    with pytest.raises(ValueError, match=message):
        prepare_video_inputs(videos, None, vision=VisionEncoder(tower), feature_dim=None, num_frames=4)


def test_files_and_clips_without_a_vision_tower(tmp_path, llama, tokenizer):
    vm = wrap_model(llama, method="llava", vision_hidden_size=32, tokenizer=tokenizer, num_frames=4)
    path = write_mp4(tmp_path / "a.mp4", num_frames=12, width=32, height=32)
    with pytest.raises(ValueError, match=r"videos\[0\]: a video file needs a vision tower"):
        vm.prepare_videos([path])
    with pytest.raises(ValueError, match=r"videos\[0\]: a VideoClip needs a vision tower"):
        vm.prepare_videos([load_video(path, num_frames=2)])
