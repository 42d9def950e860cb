"""Bad input gets a clear error, never a silent wrong answer."""

import pytest
import torch
from conftest import DV, encode, random_features
from tiny_models import make_tiny_lm

from video2param import AdapterMismatchError, VideoAdapterConfig, VideoModel, wrap_model


@pytest.fixture(params=["llava", "vipe"])
def vm(request, llama, tokenizer):
    opts = {"hidden_dim": 32, "num_heads": 4, "depth": 1} if request.param == "vipe" else {}
    cfg = VideoAdapterConfig(method=request.param, vision_hidden_size=DV, num_frames=4, rank=4, inject_every=2,
                             options=opts)
    return wrap_model(llama, cfg, tokenizer=tokenizer)


def test_feature_width_mismatch(vm, tokenizer):
    ids, mask = encode(tokenizer, ["<video> what ?"])
    with pytest.raises(ValueError, match="feature width 7 does not match the adapter's vision_hidden_size 16"):
        vm(input_ids=ids, attention_mask=mask, videos=random_features(1, dim=7))


def test_video_batch_differs_from_text_batch(vm, tokenizer):
    ids, mask = encode(tokenizer, ["<video> a ?", "<video> b ?", "<video> c ?"])
    with pytest.raises(ValueError, match=r"2 video\(s\) for a text batch of 3"):
        vm(input_ids=ids, attention_mask=mask, videos=random_features(2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_features(vm, tokenizer, bad):
    ids, mask = encode(tokenizer, ["<video> a ?", "<video> b ?"])
    feats = random_features(2)
    feats[1, 2, 0, 3] = bad
    with pytest.raises(ValueError, match=r"video\(s\) \[1\] contain NaN or inf"):
        vm(input_ids=ids, attention_mask=mask, videos=feats)


def test_wrong_tensor_rank_and_pixels_without_tower(vm, tokenizer):
    ids, mask = encode(tokenizer, ["<video> a ?"])
    with pytest.raises(ValueError, match="expected features"):
        vm(input_ids=ids, attention_mask=mask, videos=torch.randn(1, 4, DV))
    with pytest.raises(ValueError, match="no vision tower"):
        vm(input_ids=ids, attention_mask=mask, videos=torch.rand(1, 2, 3, 8, 8))


def test_bad_frame_mask(vm, tokenizer):
    ids, mask = encode(tokenizer, ["<video> a ?"])
    with pytest.raises(ValueError, match="frame_mask: expected shape"):
        vm(input_ids=ids, attention_mask=mask, videos=random_features(1), frame_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="no real frame"):
        vm(input_ids=ids, attention_mask=mask, videos=random_features(1), frame_mask=torch.zeros(1, 4, dtype=torch.bool))


def test_too_many_frames(vm, tokenizer):
    ids, mask = encode(tokenizer, ["<video> a ?"])
    with pytest.raises(ValueError, match="num_frames=4"):
        vm(input_ids=ids, attention_mask=mask, videos=random_features(1, frames=6))


def test_videos_and_context_together(vm, tokenizer):
    ids, mask = encode(tokenizer, ["<video> a ?"])
    ctx = vm.encode_video(random_features(1))
    with pytest.raises(ValueError, match="either videos= or context="):
        vm(input_ids=ids, attention_mask=mask, videos=random_features(1), context=ctx)


def test_context_of_the_other_kind(llama, tokenizer):
    token_vm = wrap_model(make_tiny_lm("llama", vocab_size=len(tokenizer) + 8), method="llava", vision_hidden_size=DV,
                          num_frames=4, tokenizer=tokenizer)
    weight_vm = wrap_model(llama, method="vipe", vision_hidden_size=DV, num_frames=4, rank=4, hidden_dim=32,
                           num_heads=4, depth=1, tokenizer=tokenizer)
    ids, mask = encode(tokenizer, ["<video> a ?"])
    with pytest.raises(ValueError, match="TokenContext cannot drive a 'vipe' adapter"):
        weight_vm(input_ids=ids, attention_mask=mask, context=token_vm.encode_video(random_features(1)))


def test_unknown_method(llama):
    with pytest.raises(ValueError, match="unknown method 'vlora'; available: .*llava.*vipe"):
        wrap_model(llama, method="vlora")


def test_not_a_causal_lm():
    with pytest.raises(TypeError, match="HuggingFace causal LM"):
        wrap_model(torch.nn.Linear(2, 2), method="llava", vision_hidden_size=DV)


def test_adapter_for_another_base_model(tmp_path, tokenizer):
    vm = wrap_model(make_tiny_lm("llama", vocab_size=len(tokenizer) + 8), method="vipe", vision_hidden_size=DV,
                    num_frames=4, rank=4, hidden_dim=32, num_heads=4, depth=1, tokenizer=tokenizer)
    vm.save_pretrained(tmp_path / "adapter")
    other = make_tiny_lm("qwen2", vocab_size=len(tokenizer) + 8)
    with pytest.raises(AdapterMismatchError, match="another base model: model_type: adapter has 'llama', model has 'qwen2'"):
        VideoModel.from_pretrained(other, tmp_path / "adapter", tokenizer=tokenizer)
    # The failed load leaves the other model untouched.
    assert not any(type(m).__name__ == "LowRankWrapper" for m in other.modules())


def test_video_token_beyond_the_embedding_rows(tokenizer):
    small = make_tiny_lm("llama", vocab_size=len(tokenizer))  # no room for the <video> id
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        wrap_model(small, method="llava", vision_hidden_size=DV, num_frames=4, tokenizer=tokenizer)
    assert not any(type(m).__name__ == "LowRankWrapper" for m in small.modules())


@pytest.mark.parametrize("method", ["llava", "vipe"])
def test_unknown_feature_width(llama, method):
    with pytest.raises(ValueError, match="vision_hidden_size: unknown"):
        wrap_model(llama, method=method)


# ---- hardening (issue #10): configuration, loading, video files, empty inputs ---------------------------------
@pytest.mark.parametrize(
    "options, message",
    [
        ({"merge": "false"}, r"options.merge: expected a bool, got 'false' \(str\)"),
        ({"targets": 5}, r"targets: expected a list"),
        ({"keep_ratios": "ab"}, r"options.keep_ratios: expected a list of finite numbers or None, got 'ab' \(str\)"),
        ({"dropout": "x"}, r"options.dropout: expected a finite number, got 'x' \(str\)"),
        ({"alpha": float("inf")}, r"alpha: expected a finite number, got inf"),
        ({"num_frames": 1e9}, r"num_frames: expected an int, got 1000000000.0 \(float\)"),
        ({"rank": 10**6}, r"rank: must be <= 2048"),
    ],
)
def test_wrap_model_type_checks_every_option(llama, options, message):
    kwargs = {"method": "vipe", "vision_hidden_size": DV, "hidden_dim": 32, "num_heads": 4, "depth": 1, **options}
    with pytest.raises(ValueError, match=message):
        wrap_model(llama, **kwargs)
    assert not any(type(m).__name__ == "LowRankWrapper" for m in llama.modules())


def test_loading_from_a_big_unrelated_directory_is_quick_and_short(tmp_path, llama, tokenizer):
    import time

    from video2param.hub import AdapterNotFoundError

    for i in range(300):
        (tmp_path / f"pkg{i:03d}" / "sub").mkdir(parents=True)
        (tmp_path / f"pkg{i:03d}" / "sub" / "file.txt").write_text("x")
    start = time.perf_counter()
    with pytest.raises(AdapterNotFoundError, match="missing required file") as info:
        VideoModel.from_pretrained(llama, tmp_path, tokenizer=tokenizer)
    assert time.perf_counter() - start < 5 and len(str(info.value)) < 1000 and "file.txt" not in str(info.value)


def test_video_path_errors_reach_the_model_accurately(tmp_path, llama, tokenizer):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from video2param import VideoDecodeError

    tower = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=4))
    vm = wrap_model(llama, method="llava", vision=tower, tokenizer=tokenizer, num_frames=4)
    (tmp_path / "a.mp4").symlink_to(tmp_path / "b.mp4")
    (tmp_path / "b.mp4").symlink_to(tmp_path / "a.mp4")
    ids, mask = encode(tokenizer, ["<video> a ?"])
    with pytest.raises(VideoDecodeError, match="a.mp4: cannot be opened: too many levels of symbolic links"):
        vm(input_ids=ids, attention_mask=mask, videos=[tmp_path / "a.mp4"])


@pytest.mark.parametrize("videos", [[], torch.empty(0, 4, 4, DV), torch.empty(1, 0, 4, DV)])
def test_empty_video_batches(vm, tokenizer, videos):
    ids, mask = encode(tokenizer, ["<video> a ?"])
    with pytest.raises(ValueError, match="videos: (an )?empty"):
        vm(input_ids=ids, attention_mask=mask, videos=videos)


@pytest.mark.parametrize("storage", ["int8", "zero3", "flat"])
def test_merge_refuses_quantized_or_sharded_weights_and_leaves_every_weight_intact(llama, tokenizer, storage):
    # A cast of the delta into int8 storage, or an add into one shard, would be a silently wrong model.
    cfg = VideoAdapterConfig(method="vipe", vision_hidden_size=DV, num_frames=4, rank=4, inject_every=1,
                             options={"hidden_dim": 32, "num_heads": 4, "depth": 1})
    vm = wrap_model(llama, cfg, tokenizer=tokenizer)
    with torch.no_grad():
        for p in vm.method.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ctx = vm.encode_video(random_features(1))
    wrappers = list(vm._wrappers.values())
    last = wrappers[-1].base  # merged last: every earlier wrapper must be restored
    if storage == "int8":
        last.weight = torch.nn.Parameter(torch.ones_like(last.weight, dtype=torch.int8), requires_grad=False)
    elif storage == "zero3":
        last.weight.ds_id = 7  # what DeepSpeed ZeRO-3 sets on a partitioned parameter
    else:
        last.weight = torch.nn.Parameter(last.weight.detach().reshape(-1).clone())
    before = {name: p.detach().clone() for name, p in vm.llm.named_parameters()}
    with pytest.raises(ValueError, match={"int8": "torch.int8", "zero3": "sharded", "flat": "shape"}[storage]):
        with vm.merged(ctx):
            pass
    for name, p in vm.llm.named_parameters():
        assert torch.equal(p, before[name]), name
    assert all(w.merged_context is None for w in wrappers)
