"""Regression tests for the holes found in use: checkpointing, answer leaks, the video mark, crossing contexts,
generate with several sequences per prompt, and re-entrant merging."""

from __future__ import annotations

import copy

import pytest
import torch

import conformance_methods  # noqa: F401  (registers the test methods)
from conftest import DV, encode, random_features
from tiny_models import make_tiny_lm
from video2param import TokenContext, VideoAdapterConfig, WeightContext, wrap_model

VIPE = {"hidden_dim": 16, "depth": 1, "num_heads": 2}


def _vipe(llm, tokenizer, stage="pretrain", **common):
    cfg = dict(method="vipe", vision_hidden_size=DV, num_frames=4, rank=4, inject_every=2, options=VIPE)
    cfg.update(common)
    return wrap_model(llm, VideoAdapterConfig(**cfg), tokenizer=tokenizer, stage=stage)


def _wake(vm, seed=0):
    """Give every zero-initialised parameter a value, so the video changes the answer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vm.method.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return vm


# ---- 1. gradient checkpointing -----------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["pretrain", "sft"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, stage, reentrant):
    ids, mask = encode(tokenizer, ["what colour is the object ?", "which way does it move ?"])
    labels = ids.masked_fill(mask == 0, -100)
    feats = random_features(2)
    vocab = len(tokenizer) + 8  # fixed: wrapping adds <video> to the tokenizer

    def grads(checkpointing):
        llm = make_tiny_lm("llama", vocab_size=vocab)
        torch.manual_seed(0)  # the method's own init
        vm = _wake(_vipe(llm, tokenizer, stage=stage))
        vm.train()
        if checkpointing:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        loss = vm(input_ids=ids, attention_mask=mask, videos=feats, labels=labels).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in vm.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    assert any(n.startswith("method.to_A") for n in plain)
    for name, g in plain.items():
        assert checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert all(g.abs().sum() > 0 for n, g in checkpointed.items() if n.startswith("method.to_A"))


# ---- 2. prompt-conditioned methods read the question only --------------------------------------------------
def test_prompt_methods_never_see_the_answer_or_the_mark(tokenizer, llama):
    vm = wrap_model(llama, VideoAdapterConfig(method="prompt_pool_test", vision_hidden_size=DV, num_frames=4),
                    tokenizer=tokenizer)
    method = vm.method
    question = "<video> what colour is the object ?"
    ids_a, mask = encode(tokenizer, [question + " red"], padding_side="right")
    ids_b, _ = encode(tokenizer, [question + " blue"], padding_side="right")
    n_answer = 1
    labels_a = ids_a.clone()
    labels_a[:, :-n_answer] = -100
    labels_b = ids_b.clone()
    labels_b[:, :-n_answer] = -100
    feats = random_features(1)

    vm(input_ids=ids_a, attention_mask=mask, videos=feats, labels=labels_a)
    seen_a = method.last_cond.prompt
    vm(input_ids=ids_b, attention_mask=mask, videos=feats, labels=labels_b)
    seen_b = method.last_cond.prompt
    assert torch.equal(seen_a.embeds * seen_a.mask[..., None], seen_b.embeds * seen_b.mask[..., None])
    assert seen_a.texts == seen_b.texts == ["what colour is the object ?"]
    assert not bool(seen_a.mask[0, -1])  # the answer
    assert not bool((seen_a.mask & (ids_a == vm.video_token_id)).any())  # the mark

    # generate sees the very same question
    q_ids, q_mask = encode(tokenizer, [question])
    vm.generate(input_ids=q_ids, attention_mask=q_mask, videos=feats, max_new_tokens=1, do_sample=False)
    seen_q = method.last_cond.prompt
    assert seen_q.texts == seen_a.texts
    assert seen_q.input_ids[seen_q.mask].tolist() == seen_a.input_ids[seen_a.mask].tolist()
    # the context depends on the question, not on the answer
    ctx_a = vm.encode_video(feats, input_ids=ids_a, attention_mask=mask, labels=labels_a)
    ctx_q = vm.encode_video(feats, input_ids=q_ids, attention_mask=q_mask)
    torch.testing.assert_close(ctx_a.embeds, ctx_q.embeds)


def test_prompt_methods_need_the_prompt(tokenizer, llama):
    vm = wrap_model(llama, VideoAdapterConfig(method="prompt_pool_test", vision_hidden_size=DV, num_frames=4),
                    tokenizer=tokenizer)
    with pytest.raises(ValueError, match="conditions on the prompt"):
        vm.encode_video(random_features(1))


# ---- 3. weight methods: the mark never reaches the LLM -----------------------------------------------------
def test_weight_methods_never_feed_the_mark_to_the_llm(tokenizer, llama):
    vm = _wake(_vipe(llama, tokenizer))
    seen = []
    hook = llama.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    ids, mask = encode(tokenizer, ["<video> what colour is the object ?", "what colour is the object ?"])
    feats = random_features(2)
    out = vm(input_ids=ids, attention_mask=mask, videos=feats, labels=ids.masked_fill(mask == 0, -100))
    # The model may itself predict the mark as an answer token (a random model does): suppressed, so that what
    # reaches the embedding is the prompt's handling alone.
    vm.generate(input_ids=ids, attention_mask=mask, videos=feats, max_new_tokens=2, do_sample=False,
                suppress_tokens=[vm.video_token_id])
    hook.remove()
    assert seen and all(not bool((s == vm.video_token_id).any()) for s in seen)
    # with and without the mark: the same answer
    with_mark, _ = encode(tokenizer, ["<video> what colour is the object ?"])
    without, _ = encode(tokenizer, ["what colour is the object ?"])
    a = vm(input_ids=with_mark, videos=feats[:1]).logits
    b = vm(input_ids=without, videos=feats[:1]).logits
    torch.testing.assert_close(a, b)
    assert torch.isfinite(out.loss)


def test_weight_generate_returns_the_prompt_as_given(tokenizer, llama):
    vm = _wake(_vipe(llama, tokenizer))
    ids, mask = encode(tokenizer, ["<video> what colour is the object ?"])
    out = vm.generate(input_ids=ids, attention_mask=mask, videos=random_features(1), max_new_tokens=3,
                      do_sample=False)
    assert torch.equal(out[:, : ids.shape[1]], ids) and out.shape[1] == ids.shape[1] + 3


# ---- 4. a context drives only the model that made it -------------------------------------------------------
def test_use_on_one_model_does_not_change_another(tokenizer):
    vm_a = _wake(_vipe(make_tiny_lm("llama", vocab_size=len(tokenizer) + 8), tokenizer))
    vm_b = _wake(_vipe(make_tiny_lm("llama", vocab_size=len(tokenizer) + 8, seed=1), tokenizer), seed=1)
    ids, mask = encode(tokenizer, ["what colour is the object ?"])
    before = vm_b.llm(input_ids=ids, attention_mask=mask).logits
    with vm_a.use(vm_a.encode_video(random_features(1))):
        inside = vm_b.llm(input_ids=ids, attention_mask=mask).logits
        changed = vm_a.llm(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, inside)
    assert not torch.allclose(changed, vm_a.llm(input_ids=ids, attention_mask=mask).logits)


def test_weight_context_of_another_layout_is_refused(tokenizer):
    vm_a = _vipe(make_tiny_lm("llama", vocab_size=len(tokenizer) + 8), tokenizer, inject_every=2)
    vm_b = _vipe(make_tiny_lm("llama", vocab_size=len(tokenizer) + 8), tokenizer, inject_every=1)
    vm_c = _vipe(make_tiny_lm("llama", vocab_size=len(tokenizer) + 8), tokenizer, targets=("q", "v"))
    ids, mask = encode(tokenizer, ["what colour ?"])
    ctx = vm_a.encode_video(random_features(1))
    for other in (vm_b, vm_c):
        with pytest.raises(ValueError, match="another adapter layout"):
            other(input_ids=ids, attention_mask=mask, context=ctx)
        with pytest.raises(ValueError, match="another adapter layout"):
            with other.use(ctx):
                pass
        with pytest.raises(ValueError, match="another adapter layout"):
            other.generate(input_ids=ids, attention_mask=mask, context=ctx, max_new_tokens=1)
    # a model with the identical layout may use it
    twin = _vipe(make_tiny_lm("llama", vocab_size=len(tokenizer) + 8), tokenizer, inject_every=2)
    twin(input_ids=ids, attention_mask=mask, context=ctx)


def test_weight_context_with_wrong_widths_or_nan_is_refused(tokenizer, llama):
    vm = _vipe(llama, tokenizer)
    ids, mask = encode(tokenizer, ["what colour ?"])
    ctx = vm.encode_video(random_features(1))
    key = next(iter(ctx.deltas))
    bad = WeightContext(dict(ctx.deltas))
    lr = bad.deltas[key]
    bad.deltas[key] = type(lr)(torch.cat([lr.A, lr.A], dim=-1), lr.B, lr.scale)
    with pytest.raises(ValueError, match="features but the site maps"):
        vm(input_ids=ids, attention_mask=mask, context=bad)
    nan = WeightContext(dict(ctx.deltas))
    nan.deltas[key] = type(lr)(lr.A.clone().fill_(float("nan")), lr.B, lr.scale)
    with pytest.raises(ValueError, match="NaN"):
        vm(input_ids=ids, attention_mask=mask, context=nan)
    with pytest.raises(ValueError, match="NaN"):
        with vm.use(nan):
            pass


def test_token_context_of_another_width_is_refused(tokenizer, llama):
    vm = wrap_model(llama, VideoAdapterConfig(method="llava", vision_hidden_size=DV, num_frames=4), tokenizer=tokenizer)
    ids, mask = encode(tokenizer, ["<video> what colour ?"])
    width = llama.config.hidden_size
    with pytest.raises(ValueError, match="hidden size"):
        vm(input_ids=ids, attention_mask=mask, context=TokenContext(torch.randn(1, 5, width + 8)))
    with pytest.raises(ValueError, match="hidden size"):
        vm.generate(input_ids=ids, attention_mask=mask, context=TokenContext(torch.randn(1, 5, width - 8)))
    with pytest.raises(ValueError, match="NaN"):
        vm(input_ids=ids, attention_mask=mask, context=TokenContext(torch.full((1, 5, width), float("inf"))))


def test_use_after_unwrap_raises(tokenizer, llama):
    vm = _vipe(llama, tokenizer)
    ctx = vm.encode_video(random_features(1))
    vm.unwrap()
    with pytest.raises(RuntimeError, match="unwrapped"):
        with vm.use(ctx):
            pass


# ---- 5. generate with several sequences per prompt ---------------------------------------------------------
@pytest.mark.parametrize("method", ["llava", "vipe"])
def test_generate_with_returned_sequences_matches_one_by_one(tokenizer, llama, method):
    if method == "vipe":
        vm = _wake(_vipe(llama, tokenizer))
    else:
        vm = _wake(wrap_model(llama, VideoAdapterConfig(method="llava", vision_hidden_size=DV, num_frames=4),
                              tokenizer=tokenizer))
    ids, mask = encode(tokenizer, ["<video> what colour is it ?", "<video> which way does it move ?"])
    feats = random_features(2)
    kw = dict(max_new_tokens=3, do_sample=False, num_beams=3, num_return_sequences=2)
    both = vm.generate(input_ids=ids, attention_mask=mask, videos=feats, **kw)
    assert both.shape[0] == 4
    assert torch.equal(both[0::2, : ids.shape[1]], ids) and torch.equal(both[1::2, : ids.shape[1]], ids)
    for i in range(2):
        one_ids, one_mask = encode(tokenizer, [["<video> what colour is it ?", "<video> which way does it move ?"][i]])
        alone = vm.generate(input_ids=one_ids, attention_mask=one_mask, videos=feats[i : i + 1], **kw)
        new = both[2 * i : 2 * i + 2, ids.shape[1]:]
        assert torch.equal(new, alone[:, one_ids.shape[1]:])


def test_sampling_with_returned_sequences(tokenizer, llama):
    vm = _wake(wrap_model(llama, VideoAdapterConfig(method="llava", vision_hidden_size=DV, num_frames=4),
                          tokenizer=tokenizer))
    ids, mask = encode(tokenizer, ["<video> what colour is it ?", "<video> which way ?"])
    out = vm.generate(input_ids=ids, attention_mask=mask, videos=random_features(2), max_new_tokens=2,
                      do_sample=True, num_return_sequences=3)
    assert out.shape[0] == 6 and torch.equal(out[:3, : ids.shape[1]], ids[:1].expand(3, -1))


def test_merge_with_beams_matches_unmerged(tokenizer, llama):
    vm = _wake(_vipe(llama, tokenizer))
    ids, mask = encode(tokenizer, ["what colour is the object ?"])
    ctx = vm.encode_video(random_features(1))
    kw = dict(max_new_tokens=3, do_sample=False, num_beams=3, num_return_sequences=2)
    plain = vm.generate(input_ids=ids, attention_mask=mask, context=ctx, **kw)
    merged = vm.generate(input_ids=ids, attention_mask=mask, context=ctx, merge=True, **kw)
    assert torch.equal(plain, merged)


# ---- merged() re-entry: never a hang ----------------------------------------------------------------------
def test_merged_is_reentrant_for_the_same_video(tokenizer, llama, tmp_path):
    vm = _wake(_vipe(llama, tokenizer))
    ids, mask = encode(tokenizer, ["what colour is the object ?"])
    ctx, other = vm.encode_video(random_features(1)), vm.encode_video(random_features(1, seed=3))
    weights = {k: v.clone() for k, v in llama.state_dict().items()}
    expected = vm.generate(input_ids=ids, attention_mask=mask, context=ctx, max_new_tokens=3, do_sample=False)
    with vm.merged(ctx):
        got = vm.generate(input_ids=ids, attention_mask=mask, context=ctx, max_new_tokens=3, do_sample=False,
                          merge=True)
        with vm.merged(ctx):
            pass
        with pytest.raises(RuntimeError, match="another video is already merged"):
            with vm.merged(other):
                pass
        with pytest.raises(RuntimeError, match="merged"):
            vm.save_base_model(tmp_path / "base")
        with pytest.raises(RuntimeError, match="merged"):
            vm.unwrap()
    assert torch.equal(got, expected)
    assert all(torch.equal(weights[k], v) for k, v in llama.state_dict().items())
    # the model is usable (and mergeable) again afterwards
    with vm.merged(other):
        pass
    vm.save_base_model(tmp_path / "base")


def test_deepcopy_of_a_wrapped_model_keeps_its_own_scope(tokenizer, llama):
    vm = _wake(_vipe(llama, tokenizer))
    twin = copy.deepcopy(vm)
    ids, mask = encode(tokenizer, ["what colour ?"])
    ctx = vm.encode_video(random_features(1))
    with vm.use(ctx):
        assert torch.equal(twin.llm(input_ids=ids, attention_mask=mask).logits,
                           twin(input_ids=ids, attention_mask=mask).logits)
    torch.testing.assert_close(vm(input_ids=ids, attention_mask=mask, context=ctx).logits,
                               twin(input_ids=ids, attention_mask=mask, context=ctx).logits)


# ---- bad prompts ------------------------------------------------------------------------------------------
def test_empty_prompt_and_too_many_video_tokens(tokenizer, llama):
    vm = wrap_model(llama, VideoAdapterConfig(method="llava", vision_hidden_size=DV, num_frames=64), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="empty prompt"):
        vm(input_ids=torch.zeros((1, 0), dtype=torch.long), videos=random_features(1))
    with pytest.raises(ValueError, match="empty prompt"):
        vm(input_ids=torch.zeros((0, 3), dtype=torch.long))
    ids, mask = encode(tokenizer, ["<video> what colour ?"])
    limit = llama.config.max_position_embeddings
    with pytest.raises(ValueError, match=r"video tokens.*max_position_embeddings"):
        vm(input_ids=ids, attention_mask=mask, videos=random_features(1, frames=64, patches=limit // 64 + 1))


def test_meta_device_llm_is_refused(tokenizer):
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(ValueError, match="meta device"):
        wrap_model(llm, VideoAdapterConfig(method="vipe", vision_hidden_size=DV, num_frames=4))


def test_read_llm_matches_the_token_path_and_leaves_the_llm_untouched(tokenizer, llama):
    token_vm = _wake(wrap_model(llama, VideoAdapterConfig(method="llava", vision_hidden_size=DV, num_frames=4),
                                tokenizer=tokenizer))
    ids, mask = encode(tokenizer, ["<video> what colour ?"])
    ctx = token_vm.encode_video(random_features(1))
    readout = token_vm.read_llm(ctx, ids, mask)
    out = token_vm(input_ids=ids, attention_mask=mask, context=ctx, output_hidden_states=True)
    assert len(readout.hidden_states) == llama.config.num_hidden_layers
    for mine, theirs in zip(readout.hidden_states, out.hidden_states[:-1]):
        torch.testing.assert_close(mine, theirs)
    alone = token_vm.read_llm(ctx)  # the video alone, after BOS
    assert alone.hidden_states[0].shape[1] == 1 + ctx.num_tokens
