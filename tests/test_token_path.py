"""Token path with the llava baseline: splice, masks, padding, labels, frame masks, generate."""

import pytest
import torch
from conftest import DV, encode, random_features

from video2param import VideoAdapterConfig, wrap_model
from video2param.inject.tokens import IGNORE_INDEX


@pytest.fixture
def vm(llama, tokenizer):
    cfg = VideoAdapterConfig(method="llava", vision_hidden_size=DV, num_frames=4)
    return wrap_model(llama, cfg, tokenizer=tokenizer)


def test_video_token_added_to_tokenizer(vm, tokenizer):
    assert vm.video_token == "<video>"
    assert tokenizer.convert_tokens_to_ids("<video>") == vm.video_token_id
    ids = tokenizer("<video> what colour ?")["input_ids"]
    assert ids.count(vm.video_token_id) == 1


def test_text_only_is_the_base_model(vm, llama, tokenizer):
    ids, mask = encode(tokenizer, ["what colour is the object ?", "left ?"])
    assert torch.equal(vm(input_ids=ids, attention_mask=mask).logits, llama(input_ids=ids, attention_mask=mask).logits)


def test_splice_expands_the_mark_and_masks_labels(vm, tokenizer):
    ids, mask = encode(tokenizer, ["<video> what colour ?", "which way does it move <video> ?"], "right")
    ctx = vm.encode_video(random_features(2))
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    spliced = vm._splice(ids, mask, ctx, labels)
    n = ctx.num_tokens
    assert n == 4 * 4
    assert spliced.inputs_embeds.shape[1] == ids.shape[1] + n - 1
    assert spliced.video_positions.sum(1).tolist() == [n, n]
    assert (spliced.labels[spliced.video_positions] == IGNORE_INDEX).all()
    # The video embeddings sit exactly where the mark was.
    row1_mark = (ids[1] == vm.video_token_id).nonzero().item()
    assert spliced.video_positions[1, row1_mark : row1_mark + n].all()
    assert torch.allclose(spliced.inputs_embeds[1, row1_mark : row1_mark + n], ctx.embeds[1])
    # Text tokens keep their order and labels.
    text = spliced.labels[0][spliced.labels[0] != IGNORE_INDEX]
    assert text.tolist() == [t for t in labels[0].tolist() if t not in (vm.video_token_id, IGNORE_INDEX)]


def test_prompt_without_mark_gets_video_after_bos(vm, tokenizer):
    ids, mask = encode(tokenizer, ["what colour ?"])
    assert ids[0, 0] == tokenizer.bos_token_id
    ctx = vm.encode_video(random_features(1))
    spliced = vm._splice(ids, mask, ctx, None)
    assert spliced.video_positions[0, 1 : 1 + ctx.num_tokens].all()
    assert spliced.input_ids[0, 0] == tokenizer.bos_token_id


def test_more_than_one_mark_is_an_error(vm, tokenizer):
    ids, mask = encode(tokenizer, ["<video> what <video> colour ?"])
    with pytest.raises(ValueError, match="more than one video placeholder"):
        vm(input_ids=ids, attention_mask=mask, videos=random_features(1))


def test_left_padded_batch_equals_each_alone(vm, tokenizer):
    texts = ["<video> what colour is the object ?", "<video> left ?"]
    ids, mask = encode(tokenizer, texts, "left")
    feats = random_features(2)
    batched = vm(input_ids=ids, attention_mask=mask, videos=feats).logits
    for i, text in enumerate(texts):
        one_ids, one_mask = encode(tokenizer, [text], "left")
        alone = vm(input_ids=one_ids, attention_mask=one_mask, videos=feats[i : i + 1]).logits
        assert torch.allclose(batched[i, -alone.shape[1] :], alone[0], atol=1e-5)


def test_videos_of_different_lengths_in_one_batch(vm, tokenizer):
    ids, mask = encode(tokenizer, ["<video> what colour ?"] * 2)
    feats = random_features(2)
    frame_mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    batched = vm(input_ids=ids, attention_mask=mask, videos=feats, frame_mask=frame_mask).logits
    short = vm(input_ids=ids[1:], attention_mask=mask[1:], videos=feats[1:, :2]).logits
    # The padded frames are masked out: the final position (after the video) sees the same thing.
    assert torch.allclose(batched[1, -1], short[0, -1], atol=1e-5)
    # A list of per-video feature tensors of different lengths gives the same result.
    listed = vm(input_ids=ids, attention_mask=mask, videos=[feats[0], feats[1, :2]]).logits
    assert torch.allclose(listed[0], batched[0], atol=1e-6)
    assert torch.allclose(listed[1, -1], batched[1, -1], atol=1e-6)


def test_labels_give_a_loss_and_gradients_reach_the_projector(vm, tokenizer):
    ids, mask = encode(tokenizer, ["<video> what colour ? red"], "right")
    out = vm(input_ids=ids, attention_mask=mask, videos=random_features(1), labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vm.method.parameters())
    assert all(p.grad is None for p in vm.llm.parameters())  # stage "pretrain": LLM frozen


def test_generate_batch_equals_each_alone_and_encodes_once(vm, tokenizer, monkeypatch):
    texts = ["<video> what colour is the object ?", "<video> left ?"]
    ids, mask = encode(tokenizer, texts, "left")
    feats = random_features(2)
    calls = []
    original = vm.method.encode
    monkeypatch.setattr(vm.method, "encode", lambda *a, **k: calls.append(1) or original(*a, **k))
    out = vm.generate(input_ids=ids, attention_mask=mask, videos=feats, max_new_tokens=5, do_sample=False)
    assert len(calls) == 1
    assert out.shape[1] == ids.shape[1] + 5 and torch.equal(out[:, : ids.shape[1]], ids)
    for i, text in enumerate(texts):
        one_ids, one_mask = encode(tokenizer, [text], "left")
        alone = vm.generate(input_ids=one_ids, attention_mask=one_mask, videos=feats[i : i + 1], max_new_tokens=5,
                            do_sample=False)
        assert out[i, ids.shape[1] :].tolist() == alone[0, one_ids.shape[1] :].tolist()
    # Encode once, ask many: a reused context never calls the method again.
    ctx = vm.encode_video(feats[:1])
    calls.clear()
    for text in texts:
        q_ids, q_mask = encode(tokenizer, [text])
        vm.generate(input_ids=q_ids, attention_mask=q_mask, context=ctx, max_new_tokens=2, do_sample=False)
    assert calls == []


def test_spatial_pooling_reduces_tokens(llama, tokenizer):
    vm = wrap_model(llama, method="llava", vision_hidden_size=DV, num_frames=4, spatial_pool=2, tokenizer=tokenizer)
    ctx = vm.encode_video(random_features(1, patches=16))
    assert ctx.num_tokens == 4 * 4
    with pytest.raises(ValueError, match="square patch grid"):
        vm.encode_video(random_features(1, patches=6))
