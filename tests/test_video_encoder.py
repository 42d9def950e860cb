"""video2param.video.encoder: VisionEncoder on tiny CLIP / SigLIP towers built from configs (no downloads)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from video2param.video.encoder import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PROGRESS_MIN_FRAMES,
    FramePreprocessing,
    VisionEncoder,
)
from video2param.video.io import VideoClip, load_video

TOWER = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def tiny_clip(seed: int = 0, **overrides) -> CLIPVisionModel:
    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(**{**TOWER, **overrides}))


def tiny_siglip(seed: int = 0) -> SiglipVisionModel:
    torch.manual_seed(seed)
    return SiglipVisionModel(SiglipVisionConfig(**TOWER))


def random_frames(count: int, height: int = 48, width: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, height, width, 3), dtype=torch.uint8, generator=g)


def reference_features(tower, pixel_values: torch.Tensor, layer: int, prefix: int) -> torch.Tensor:
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[layer][:, prefix:]


def test_clip_shapes_cls_drop_and_penultimate_layer():
    tower = tiny_clip()
    encoder = VisionEncoder(tower)
    assert (encoder.num_patches, encoder.hidden_size, encoder.num_prefix_tokens) == (16, 32, 1)
    frames = random_frames(5, 32, 32)  # already the tower's size: no resize, only normalisation
    features = encoder.encode_frames(frames)
    assert features.shape == (5, 16, 32) and features.dtype == torch.float32
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    pixels = (frames.permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.testing.assert_close(features, reference_features(tower, pixels, -2, 1), rtol=1e-5, atol=1e-5)


def test_siglip_has_no_cls_and_uses_its_own_normalisation():
    tower = tiny_siglip()
    encoder = VisionEncoder(tower)
    assert (encoder.num_patches, encoder.num_prefix_tokens) == (16, 0)
    assert encoder.preprocessing.image_mean == (0.5, 0.5, 0.5)
    frames = random_frames(3, 32, 32)
    pixels = (frames.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(encoder.encode_frames(frames), reference_features(tower, pixels, -2, 0))


def test_hidden_layer_choice_and_last_hidden_state():
    tower = tiny_clip()
    frames = random_frames(2, 32, 32)
    pixels = VisionEncoder(tower).preprocessing(frames.permute(0, 3, 1, 2).float() / 255)
    for layer in (0, 1, -1):
        got = VisionEncoder(tower, hidden_layer=layer).encode_frames(frames)
        torch.testing.assert_close(got, reference_features(tower, pixels, layer, 1))
    with torch.no_grad():
        last = tower(pixels).last_hidden_state[:, 1:]
    torch.testing.assert_close(VisionEncoder(tower, hidden_layer=None).encode_frames(frames), last)
    with pytest.raises(ValueError, match="hidden_layer=5 is out of range"):
        VisionEncoder(tower, hidden_layer=5)
    with pytest.raises(ValueError, match="hidden_layer"):
        VisionEncoder(tower, hidden_layer=1.5)


def test_drop_cls_override():
    tower = tiny_clip()
    keep = VisionEncoder(tower, drop_cls=False)
    assert keep.num_patches == 17 and keep.num_prefix_tokens == 0
    with pytest.raises(ValueError, match="drop_cls=True"):
        VisionEncoder(tiny_siglip(), drop_cls=True)


def test_resize_and_crop_match_the_hf_image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from PIL import Image

    tower = tiny_clip()
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    encoder = VisionEncoder(tower, preprocessing=processor)
    assert encoder.preprocessing == FramePreprocessing((32, 32), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 32, "bicubic")
    # Smooth content, so the two bicubic implementations (PIL on uint8, torch on float) agree closely.
    y, x = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 80), indexing="ij")
    frame = torch.stack([x, y, (x + y) / 2], dim=-1).mul(255).round().to(torch.uint8)
    ours = encoder.preprocessing(frame.permute(2, 0, 1)[None].float() / 255)
    theirs = processor(Image.fromarray(frame.numpy()), return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    assert (ours - theirs).abs().mean() < 0.02


def test_preprocessing_overrides_and_errors():
    tower = tiny_clip()
    encoder = VisionEncoder(tower, image_mean=(0.1, 0.2, 0.3), image_std=(1, 1, 1))
    assert encoder.preprocessing.image_mean == (0.1, 0.2, 0.3)
    assert encoder.preprocessing.image_size == (32, 32)
    squash = FramePreprocessing.from_processor({"size": {"height": 32, "width": 32}, "image_mean": 0.5, "image_std": 0.5, "resample": 2})
    assert squash.shortest_edge is None and squash.interpolation == "bilinear"
    with pytest.raises(ValueError, match="image_std"):
        FramePreprocessing((32, 32), (0, 0, 0), (0, 1, 1))
    with pytest.raises(ValueError, match="image_size"):
        FramePreprocessing((0, 32), (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match="interpolation"):
        FramePreprocessing((32, 32), (0, 0, 0), (1, 1, 1), interpolation="lanczos")


def test_image_size_other_than_native_interpolates_position_embeddings():
    tower = tiny_clip()
    encoder = VisionEncoder(tower, image_size=48)
    assert encoder.num_patches == 36  # (48 / 8) ** 2
    assert encoder.encode_frames(random_frames(2, 48, 48)).shape == (2, 36, 32)


def test_chunking_gives_the_same_features_as_one_batch():
    tower = tiny_clip()
    frames = random_frames(11)
    whole = VisionEncoder(tower, chunk_size=64).encode_frames(frames)
    for chunk in (1, 3, 4):
        torch.testing.assert_close(VisionEncoder(tower, chunk_size=chunk).encode_frames(frames), whole)


def test_float_channels_first_input_equals_uint8_input():
    encoder = VisionEncoder(tiny_siglip())
    frames = random_frames(3)
    as_float = frames.permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(encoder.encode_frames(as_float), encoder.encode_frames(frames))
    torch.testing.assert_close(encoder(frames.numpy()), encoder.encode_frames(frames))
    # Normalisation never writes into the caller's tensor (here no resize is needed, the riskiest path).
    native = random_frames(2, 32, 32).permute(0, 3, 1, 2).float() / 255
    before = native.clone()
    VisionEncoder(tiny_clip()).encode_frames(native)
    assert torch.equal(native, before)


def test_frozen_eval_mode_and_features_usable_downstream():
    tower = tiny_clip(attention_dropout=0.5)
    tower.train()
    encoder = VisionEncoder(tower)
    assert not tower.training
    assert all(not p.requires_grad for p in encoder.parameters())
    encoder.train()  # a parent module switching to training must not wake dropout in the tower
    assert not tower.training
    frames = random_frames(4)
    first, second = encoder.encode_frames(frames), encoder.encode_frames(frames)
    torch.testing.assert_close(first, second)  # deterministic: dropout is off
    assert not first.requires_grad and first.grad_fn is None
    # Not an inference-mode tensor: a trainable projector can take it and backpropagate.
    head = nn.Linear(encoder.hidden_size, 3)
    head(first).sum().backward()
    assert head.weight.grad is not None
    assert all(p.grad is None for p in tower.parameters())


def test_dtype_follows_the_tower():
    tower = tiny_clip().to(torch.bfloat16)
    encoder = VisionEncoder(tower)
    features = encoder.encode_frames(random_frames(2))
    assert features.dtype == torch.bfloat16 and features.device == torch.device("cpu")
    assert "dtype=bfloat16" in encoder.identity


def test_encode_clips_pads_and_masks():
    encoder = VisionEncoder(tiny_clip(), chunk_size=2)
    short, long = random_frames(3, seed=1), random_frames(5, seed=2)
    clip = VideoClip(short, torch.arange(3, dtype=torch.float64))
    features, mask = encoder.encode_clips([clip, long])
    assert features.shape == (2, 5, 16, 32) and mask.dtype == torch.bool
    assert mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    torch.testing.assert_close(features[0, :3], encoder.encode_frames(short))
    torch.testing.assert_close(features[1], encoder.encode_frames(long))
    assert features[0, 3:].abs().sum() == 0
    with pytest.raises(ValueError, match="at least one clip"):
        encoder.encode_clips([])
    with pytest.raises(ValueError, match="clip 1 has no frames"):
        encoder.encode_clips([short, short[:0]])


def test_encode_video_streams_the_same_features_as_load_then_encode(tmp_path):
    pytest.importorskip("av")
    import video_files as vf

    path = vf.write_mp4(tmp_path / "v.mp4", 12, 24)
    encoder = VisionEncoder(tiny_clip(), chunk_size=4)
    clip = load_video(path, num_frames=16)  # short video: frames repeat
    streamed = encoder.encode_video(path, num_frames=16)
    torch.testing.assert_close(streamed.features, encoder.encode_frames(clip.frames))
    torch.testing.assert_close(streamed.timestamps, clip.timestamps)
    assert streamed.source == str(path) and streamed.fps == pytest.approx(24)
    every = encoder.encode_video(path, num_frames=None)
    assert every.features.shape[0] == 12
    torch.testing.assert_close(every.features, encoder.encode_frames(load_video(path, num_frames=None).frames))
    assert not streamed.features.is_inference() and not every.features.is_inference()


def test_bad_frames_are_rejected():
    encoder = VisionEncoder(tiny_clip())
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        encoder.encode_frames(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(T, 3, H, W\)"):
        encoder.encode_frames(torch.zeros(2, 32, 32, 3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        encoder.encode_frames(torch.full((1, 3, 32, 32), 255.0))
    with pytest.raises(ValueError, match="4-D"):
        encoder.encode_frames(torch.zeros(32, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="dtype"):
        encoder.encode_frames(torch.zeros(1, 32, 32, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="chunk_size"):
        VisionEncoder(tiny_clip(), chunk_size=0)
    assert encoder.encode_frames(random_frames(0)).shape == (0, 16, 32)


def test_progress_bar_switch(capsys):
    encoder = VisionEncoder(tiny_clip(), chunk_size=8, progress=True)
    encoder.encode_frames(random_frames(10, 32, 32))
    assert "encoding frames" in capsys.readouterr().err
    VisionEncoder(tiny_clip(), chunk_size=8, progress=False).encode_frames(random_frames(10, 32, 32))
    assert "encoding frames" not in capsys.readouterr().err
    auto = VisionEncoder(tiny_clip(), chunk_size=64)  # progress=None: only for long inputs
    auto.encode_frames(random_frames(8, 32, 32))
    assert "encoding frames" not in capsys.readouterr().err
    auto.encode_frames(random_frames(PROGRESS_MIN_FRAMES, 32, 32))
    assert "encoding frames" in capsys.readouterr().err


def test_composite_model_resolves_to_its_vision_tower():
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=TOWER))
    encoder = VisionEncoder(model)
    assert encoder.tower is model.vision_model and encoder.num_patches == 16
    frames = random_frames(2, 32, 32)
    torch.testing.assert_close(encoder.encode_frames(frames), VisionEncoder(model.vision_model).encode_frames(frames))


class PatchTower(nn.Module):
    """A user's tower without a config: conv patches + one linear, returning last_hidden_state only."""

    def __init__(self, dim: int = 12, cls_token: bool = False):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, kernel_size=8, stride=8)
        self.mix = nn.Linear(dim, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim)) if cls_token else None

    def forward(self, pixel_values, output_hidden_states=False):
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        return SimpleNamespace(last_hidden_state=self.mix(x))


def test_user_module_contract():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="image_mean, image_std, image_size"):
        VisionEncoder(PatchTower(), hidden_layer=None)
    kwargs = dict(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), image_size=32, hidden_layer=None)
    encoder = VisionEncoder(PatchTower(), **kwargs)
    assert (encoder.num_patches, encoder.hidden_size, encoder.num_prefix_tokens) == (16, 12, 0)
    with_cls = VisionEncoder(PatchTower(cls_token=True), **kwargs)
    assert (with_cls.num_patches, with_cls.num_prefix_tokens) == (16, 1)  # 17 tokens: a square plus one
    assert encoder.encode_frames(random_frames(3)).shape == (3, 16, 12)
    with pytest.raises(ValueError, match="did not return hidden_states"):
        VisionEncoder(PatchTower(), **{**kwargs, "hidden_layer": -2})
    with pytest.raises(ValueError, match="contract"):
        VisionEncoder(nn.Linear(3, 3), **kwargs)


def test_identity_is_stable_and_sensitive():
    a, b = VisionEncoder(tiny_clip(seed=0)), VisionEncoder(tiny_clip(seed=0))
    assert a.identity == b.identity
    assert "CLIPVisionModel" in a.identity
    assert VisionEncoder(tiny_clip(seed=1)).identity != a.identity  # other weights
    assert VisionEncoder(tiny_clip(seed=0), hidden_layer=-1).identity != a.identity
    assert VisionEncoder(tiny_clip(seed=0), image_mean=(0.5, 0.5, 0.5)).identity != a.identity
    assert VisionEncoder(tiny_clip(seed=0), drop_cls=False).identity != a.identity


def test_from_pretrained_reads_local_tower_and_processor_offline(tmp_path):
    tower = tiny_clip()
    tower.save_pretrained(tmp_path)
    processor = {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": 32},
        "crop_size": {"height": 32, "width": 32},
        "do_center_crop": True,
        "image_mean": [0.25, 0.25, 0.25],
        "image_std": [0.5, 0.5, 0.5],
        "resample": 2,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    encoder = VisionEncoder.from_pretrained(tmp_path, chunk_size=4)
    assert encoder.preprocessing == FramePreprocessing((32, 32), (0.25,) * 3, (0.5,) * 3, 32, "bilinear")
    assert encoder.chunk_size == 4
    frames = random_frames(2, 32, 32)
    reference = VisionEncoder(tower, preprocessing=processor)
    torch.testing.assert_close(encoder.encode_frames(frames), reference.encode_frames(frames))
    assert encoder.identity == reference.identity


def test_from_pretrained_composite_checkpoint_loads_only_the_vision_tower(tmp_path):
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=TOWER))
    model.save_pretrained(tmp_path)
    encoder = VisionEncoder.from_pretrained(tmp_path, dtype=torch.float64)  # no processor file: CLIP defaults
    assert isinstance(encoder.tower, CLIPVisionModel) and encoder.dtype == torch.float64
    assert encoder.preprocessing.image_mean == OPENAI_CLIP_MEAN
    frames = random_frames(2, 32, 32)
    expected = VisionEncoder(model.vision_model.to(torch.float64)).encode_frames(frames)
    torch.testing.assert_close(encoder.encode_frames(frames), expected)
