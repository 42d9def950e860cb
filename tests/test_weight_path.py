"""Weight path: per-sample deltas, context scoping, merge/unmerge, unwrap — with a method defined in the tests."""

import threading

import pytest
import torch
from conftest import DV, encode, random_features
from tiny_models import make_tiny_lm
from weight_method import PooledDelta  # noqa: F401  (registers the method)

from video2param import VideoAdapterConfig, wrap_model
from video2param.inject.lowrank import active_context, use_weight_context


def _vm(llm, tokenizer=None, **kw):
    cfg = VideoAdapterConfig(method="pooled_delta_test", vision_hidden_size=DV, rank=4, alpha=8, inject_every=2,
                             num_frames=4, **kw)
    return wrap_model(llm, cfg, tokenizer=tokenizer)


def _reference_delta_logits(llm, vm, ids, mask, feats):
    """Logits computed by materialising each sample's dense ΔW: the spec the batched path must match."""
    outs = []
    for b in range(ids.shape[0]):
        ctx = vm.encode_video(feats[b : b + 1])
        with vm.merged(ctx):
            outs.append(vm(input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1], context=ctx).logits)
    return torch.cat(outs)


def test_batch_of_different_videos_equals_each_alone(llama, tokenizer):
    vm = _vm(llama, tokenizer)
    ids, mask = encode(tokenizer, ["what colour is the object ?", "which way does it move ?"], "right")
    feats = random_features(2)
    batched = vm(input_ids=ids, attention_mask=mask, videos=feats).logits
    alone = torch.cat([vm(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], videos=feats[i : i + 1]).logits
                       for i in range(2)])
    assert torch.allclose(batched, alone, atol=1e-5)
    merged = _reference_delta_logits(llama, vm, ids, mask, feats)
    for i in range(2):
        n = int(mask[i].sum())
        assert torch.allclose(batched[i, :n], merged[i, :n], atol=1e-4)
    plain = vm.llm(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(batched, plain, atol=1e-3), "the video must change the logits"


def test_per_sample_B(llama, tokenizer):
    vm = _vm(llama, tokenizer, options={"per_sample_B": True})
    ids, mask = encode(tokenizer, ["what colour is it ?"] * 2)
    feats = random_features(2)
    batched = vm(input_ids=ids, attention_mask=mask, videos=feats).logits
    alone = vm(input_ids=ids[1:], attention_mask=mask[1:], videos=feats[1:]).logits
    assert torch.allclose(batched[1:], alone, atol=1e-5)


def test_merge_equals_unmerged_and_unmerge_is_exact(llama, tokenizer):
    vm = _vm(llama, tokenizer)
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    ids, mask = encode(tokenizer, ["what colour is the object ?"])
    ctx = vm.encode_video(random_features(1))
    unmerged = vm(input_ids=ids, attention_mask=mask, context=ctx).logits
    with vm.merged(ctx):
        merged = vm(input_ids=ids, attention_mask=mask, context=ctx).logits
        other = vm.encode_video(random_features(1, seed=5))
        with pytest.raises(RuntimeError, match="merged"):
            vm(input_ids=ids, attention_mask=mask, context=other)  # another video while this one is merged
    assert torch.allclose(unmerged, merged, atol=1e-5)
    after = llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_merge_restores_weights_on_exception(llama, tokenizer):
    vm = _vm(llama, tokenizer)
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    ctx = vm.encode_video(random_features(1))
    with pytest.raises(KeyError):
        with vm.merged(ctx):
            raise KeyError("boom")
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())
    with pytest.raises(ValueError, match="exactly one video"):
        with vm.merged(vm.encode_video(random_features(2))):
            pass


def test_generate_merge_fast_path_matches(llama, tokenizer):
    vm = _vm(llama, tokenizer)
    ids, mask = encode(tokenizer, ["what colour is the object ?"])
    feats = random_features(1)
    a = vm.generate(input_ids=ids, attention_mask=mask, videos=feats, max_new_tokens=4, do_sample=False)
    b = vm.generate(input_ids=ids, attention_mask=mask, videos=feats, max_new_tokens=4, do_sample=False, merge=True)
    assert torch.equal(a, b)


def test_context_is_restored_after_exception(llama, tokenizer):
    vm = _vm(llama, tokenizer)
    ids, mask = encode(tokenizer, ["what colour ?"])
    assert active_context(vm._scope) is None
    layer = vm.llm.model.layers[1]

    def fail(*args, **kwargs):
        assert active_context(vm._scope) is not None  # the video is active inside the call
        raise RuntimeError("layer failed")

    layer.forward = fail
    with pytest.raises(RuntimeError, match="layer failed"):
        vm(input_ids=ids, attention_mask=mask, videos=random_features(1))
    del layer.forward
    assert active_context(vm._scope) is None
    text_only = vm(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(text_only, vm.llm(input_ids=ids, attention_mask=mask).logits)


def test_two_threads_never_see_each_others_video(llama, tokenizer):
    vm = _vm(llama, tokenizer)
    ids, mask = encode(tokenizer, ["what colour is the object ?"])
    ctxs = [vm.encode_video(random_features(1, seed=s)) for s in (1, 2)]
    expected = [vm(input_ids=ids, attention_mask=mask, context=c).logits for c in ctxs]
    barrier = threading.Barrier(2)
    results: dict[int, list[bool]] = {0: [], 1: []}

    def worker(i):
        with vm.use(ctxs[i]):
            barrier.wait()  # both contexts are active at the same time
            for _ in range(5):
                results[i].append(torch.allclose(vm.llm(input_ids=ids, attention_mask=mask).logits, expected[i], atol=1e-6))
        assert active_context(vm._scope) is None

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results[0] == [True] * 5 and results[1] == [True] * 5


def test_unwrap_restores_modules_bit_identical(tokenizer):
    llm = make_tiny_lm("gpt2", vocab_size=len(tokenizer) + 8)
    modules = dict(llm.named_modules())
    state = {k: v.clone() for k, v in llm.state_dict().items()}
    vm = _vm(llm, tokenizer)
    assert any(type(m).__name__ == "LowRankWrapper" for m in llm.modules())
    back = vm.unwrap()
    assert back is llm
    assert dict(back.named_modules()).keys() == modules.keys()
    assert all(back.get_submodule(n) is m for n, m in modules.items() if n)
    assert all(torch.equal(state[k], v) for k, v in back.state_dict().items())
    with pytest.raises(RuntimeError, match="unwrapped"):
        vm(input_ids=torch.tensor([[1, 2]]))


def test_context_batch_mismatch(llama, tokenizer):
    vm = _vm(llama, tokenizer)
    ids, mask = encode(tokenizer, ["a ?", "b ?", "c ?"])
    ctx = vm.encode_video(random_features(2))
    with pytest.raises(ValueError, match="2 video"):
        vm(input_ids=ids, attention_mask=mask, context=ctx)


def test_beam_search_expands_the_context(llama, tokenizer):
    vm = _vm(llama, tokenizer)
    ids, mask = encode(tokenizer, ["what colour is it ?", "which way ?"])
    out = vm.generate(input_ids=ids, attention_mask=mask, videos=random_features(2), max_new_tokens=3,
                      num_beams=2, do_sample=False)
    assert out.shape[0] == 2
