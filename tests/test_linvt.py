"""LinVT (method="linvt"): linearity, gradients, axes, fixed token count, frame masks, question-only conditioning,
starting from a saved llava adapter, a frozen projector, and option errors."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import DV, WORDS, random_features
from tiny_models import make_tiny_lm
from video2param import VideoAdapterConfig, VideoModel, wrap_model
from video2param.data.tokenizer import build_word_tokenizer
from video2param.methods.linvt import LinvtMethod, LinvtOptions, pool_in_time, select_top_k

SMALL = {"hidden_dim": 16, "num_heads": 2, "scorer_layers": 2, "top_k": 10, "scale_queries": [4, 2],
         "scale_windows": [1, 2]}
QUESTIONS = ["<video> what colour is the object ?", "<video> which way does it move ?"]


def _tokenizer():
    tok = build_word_tokenizer(WORDS)
    tok.add_tokens(["<video>"], special_tokens=True)
    tok.padding_side = "right"
    return tok


def build(frames: int = 4, seed: int = 0, wake: bool = True, **options) -> VideoModel:
    tok = _tokenizer()
    llm = make_tiny_lm("llama", vocab_size=len(tok) + 8)
    torch.manual_seed(seed)
    config = VideoAdapterConfig(method="linvt", vision_hidden_size=DV, num_frames=frames,
                                options={**SMALL, **options})
    vm = wrap_model(llm, config, tokenizer=tok)
    if wake:  # move every parameter off its initial value (LayerNorms at 1/0, ...) so no symmetry hides a bug
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in vm.method.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
            vm.method.attention_mix.fill_(0.7)
    return vm


def questions(vm: VideoModel, n: int = 1, answers: list[str] | None = None):
    texts = [q + (f" {answers[i]}" if answers else "") for i, q in enumerate(QUESTIONS[:n])]
    enc = vm.tokenizer(texts, return_tensors="pt", padding=True)
    labels = None
    if answers:
        labels = torch.full_like(enc["input_ids"], -100)
        last = enc["attention_mask"].sum(1) - 1
        labels[torch.arange(n), last] = enc["input_ids"][torch.arange(n), last]
    return enc["input_ids"], enc["attention_mask"], labels


def tokenize(vm: VideoModel, features, frame_mask=None, n_questions: int | None = None):
    ids, mask, _ = questions(vm, n_questions or features.shape[0])
    cond = vm._conditioning(features.shape[0], ids, mask, None, None)
    return vm.method.tokenize(features, frame_mask, cond)


# ---- linearity -----------------------------------------------------------------------------------------------
def test_every_output_token_is_a_weighted_average_of_the_frame_tokens():
    vm = build()
    feats = random_features(2, frames=4)
    frame_mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    out = tokenize(vm, feats, frame_mask)
    weights = out.weights()
    assert weights.shape == (2, 6, 16)
    torch.testing.assert_close(weights @ out.frame_tokens, out.tokens, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 6), rtol=0, atol=1e-6)
    assert bool((weights >= 0).all())  # alpha in [0, 1]: a convex combination
    # Only kept tokens of real frames carry weight: padding and what top-k dropped never reach the output.
    kept = out.selected.reshape(2, -1)
    assert bool((weights[~kept[:, None, :].expand_as(weights)] == 0).all())
    assert int(out.selected[1, 3].sum()) == 0 and int(kept.sum(1).max()) == SMALL["top_k"]
    ctx = vm.encode_video(feats, frame_mask, input_ids=questions(vm, 2)[0], attention_mask=questions(vm, 2)[1])
    torch.testing.assert_close(ctx.embeds, out.tokens)


def test_the_mix_stays_in_0_1_and_keeps_learning_outside():
    vm = build()
    with torch.no_grad():
        vm.method.attention_mix.copy_(torch.tensor([-0.5, 1.5]))
    out = tokenize(vm, random_features(1, frames=4))
    assert vm.method.mix.tolist() == [0.0, 1.0]
    for weights in out.aggregation:  # still a convex combination
        assert bool((weights >= 0).all())
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights[..., 0]), rtol=0, atol=1e-6)
    out.tokens.square().sum().backward()
    assert bool((vm.method.attention_mix.grad.abs() > 0).all())  # straight through the clamp


def test_a_video_of_one_repeated_vector_gives_that_vector_everywhere():
    vm = build(temporal_embedding=False)  # the same feature in every frame gives the same frame token everywhere
    feats = random_features(1, frames=1, patches=1).expand(1, 4, 4, DV).contiguous()
    out = tokenize(vm, feats)
    token = out.frame_tokens[0, 0]
    assert torch.allclose(out.frame_tokens[0], token.expand_as(out.frame_tokens[0]))
    torch.testing.assert_close(out.tokens[0], token.expand_as(out.tokens[0]), rtol=1e-5, atol=1e-6)


# ---- gradients -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mix, reads_question", [(1.0, False), (0.0, False), (1.0, True)])
def test_the_scorer_and_every_query_receive_gradients(mix, reads_question):
    vm = build(scorer_reads_question=reads_question)
    with torch.no_grad():
        vm.method.attention_mix.fill_(mix)
    ids, mask, labels = questions(vm, 2, answers=["red", "left"])
    loss = vm(input_ids=ids, attention_mask=mask, labels=labels, videos=random_features(2, frames=4)).loss
    loss.backward()
    scorer = vm.method.scorer
    for name, p in scorer.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), f"scorer.{name} got no gradient"
    for s, aggregator in enumerate(vm.method.aggregators):
        per_query = aggregator.queries.grad.abs().sum(-1)
        if mix == 0.0:  # ordered selection only: the queries wait for alpha to move (it gets a gradient)
            assert bool((per_query == 0).all())
        else:
            assert bool((per_query > 0).all()), f"scale {s}: queries {per_query.tolist()}"
    assert bool((vm.method.attention_mix.grad.abs() > 0).all())
    if mix == 1.0:  # no parameter whose gradient is only rounding noise (e.g. a bias every softmax ignores)
        largest = max(float(p.grad.abs().max()) for p in vm.method.parameters())
        weak = [n for n, p in vm.method.named_parameters() if float(p.grad.abs().max()) < 1e-6 * largest]
        assert not weak, f"structurally dead parameters: {weak}"


def test_selection_keeps_the_top_k_real_tokens_in_order():
    scores = torch.tensor([[0.5, 3.0, -1.0, 2.0, 9.0]])
    real = torch.tensor([[True, True, True, True, False]])
    assert select_top_k(scores, real, 2).tolist() == [[False, True, False, True, False]]
    assert select_top_k(scores, real, 10).tolist() == [[True, True, True, True, False]]


# ---- axes ------------------------------------------------------------------------------------------------------
def test_scorer_attends_within_frames_then_across_frames():
    vm = build()
    scorer = vm.method.scorer.eval()
    tokens = torch.randn(2, 4, 5, 32)
    real = torch.ones(2, 4, dtype=torch.bool)
    base = scorer(tokens, real)
    perm = torch.tensor([3, 0, 4, 1, 2])
    shuffled = tokens.clone()
    shuffled[0, 2] = tokens[0, 2, perm]
    out = scorer(shuffled, real)
    # Permuting the patches of frame 2 permutes that frame's scores and changes nothing else.
    torch.testing.assert_close(out[0, 2], base[0, 2, perm], rtol=1e-5, atol=1e-6)
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[0, 2] = False
    torch.testing.assert_close(out[keep], base[keep], rtol=1e-5, atol=1e-6)
    # Changing frame 0 changes the scores of the other frames (temporal attention), never the other video's.
    changed = tokens.clone()
    changed[0, 0] += torch.randn(5, 32)
    out = scorer(changed, real)
    assert not torch.allclose(out[0, 3], base[0, 3])
    torch.testing.assert_close(out[1], base[1], rtol=0, atol=0)
    # A padded frame's content never reaches the real frames.
    padded = tokens.clone()
    padded[0, 3] = 100.0
    mask = torch.tensor([[True, True, True, False], [True] * 4])
    torch.testing.assert_close(scorer(padded, mask)[0, :3], scorer(tokens, mask)[0, :3], rtol=1e-5, atol=1e-6)


def test_pooling_runs_over_time_at_each_patch_position():
    torch.manual_seed(0)
    frames = torch.randn(1, 5 * 3, 4)  # T = 5 frames of P = 3 tokens
    scores = torch.randn(1, 5, 3)
    selected = torch.ones(1, 5, 3, dtype=torch.bool)
    selected[0, 1, 2] = False
    scale = pool_in_time(scores, selected, window=2)  # windows (0,1) (2,3) (4,)
    assert scale.mask.sum() == 9 and scale.index.shape == (1, 9, 2)
    pooled = scale.gather(frames)
    changed = frames.clone()
    changed[0, 3 * 3 + 1] += 1.0  # frame 3, patch 1 → pooled token of window (2,3), patch 1 only
    delta = (scale.gather(changed) - pooled).abs().sum(-1)[0]
    assert delta.nonzero().flatten().tolist() == [4]
    # Window (0,1) at patch 2 holds only frame 0 (frame 1's token was not selected).
    torch.testing.assert_close(pooled[0, 2], frames[0, 2])


def test_permuting_frames_changes_the_temporal_scales_and_patches_only_their_own_windows():
    vm = build(temporal_embedding=False, top_k=64)  # keep every token: the selection is not what is tested here
    feats = random_features(1, frames=4)
    base = tokenize(vm, feats)
    base_pooled = [s.gather(base.frame_tokens)[0] for s in base.scales]
    swapped = tokenize(vm, feats[:, [1, 0, 2, 3]])
    pooled = [s.gather(swapped.frame_tokens)[0] for s in swapped.scales]
    # Swapping frames 0 and 1 inside the first 2-frame window: scale 1 reorders, the 2-frame window's pooled
    # tokens mix the same tokens (with new weights, as scores see time); swapping 1 and 2 regroups the windows.
    assert not torch.allclose(swapped.tokens, base.tokens)
    regrouped = tokenize(vm, feats[:, [0, 2, 1, 3]])
    assert not torch.allclose(regrouped.scales[1].gather(regrouped.frame_tokens)[0], base_pooled[1])
    assert torch.allclose(pooled[0].sort(0).values, base_pooled[0].sort(0).values)
    # Permuting the patches of frame 3 leaves every pooled token of windows without frame 3 unchanged.
    shuffled = feats.clone()
    shuffled[0, 3] = feats[0, 3, [2, 0, 3, 1]]
    out = tokenize(vm, shuffled)
    pooled = [s.gather(out.frame_tokens)[0] for s in out.scales]
    torch.testing.assert_close(pooled[0][:12], base_pooled[0][:12], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled[1][:4], base_pooled[1][:4], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(pooled[1][4:], base_pooled[1][4:])


def test_tta_self_attention_mixes_the_queries_of_a_scale():
    vm = build()
    feats = random_features(1, frames=4)
    base = tokenize(vm, feats).aggregation[0]
    with torch.no_grad():
        vm.method.aggregators[0].queries[0] += torch.randn(16)
    moved = tokenize(vm, feats).aggregation[0]
    assert not torch.allclose(moved[0, 1:], base[0, 1:])  # the other queries saw query 0 change


def _attention_row_spread(vm: VideoModel) -> float:
    """Mean L1 distance of a query's attention row A from the mean row of its scale, at birth (α = 0.5)."""
    from video2param.methods.linvt import ordered_selection

    out = tokenize(vm, random_features(2, frames=4))
    spreads = []
    for s, (scale, agg) in enumerate(zip(out.scales, out.aggregation)):
        alpha = vm.method.mix[s]
        attention = (agg - (1 - alpha) * ordered_selection(scale.mask, scale.score, agg.shape[1])) / alpha
        spreads.append((attention - attention.mean(1, keepdim=True)).abs().sum(-1).mean().item())
    return min(spreads)


def test_fresh_queries_attend_differently():
    # Queries drawn at std 0.02 leave the TTA blocks as copies of one vector (the residual updates swamp them), so
    # every output token gets the same attention row; trained that way they stayed identical (docs/results.md).
    spread = _attention_row_spread(build(wake=False, query_every_block=False))
    assert spread > 0.05
    assert spread > 5 * _attention_row_spread(build(wake=False, query_every_block=False, query_init_std=0.02))


def _force_shared_block_updates(vm: VideoModel) -> VideoModel:
    """Make every TTA block add one large update shared by all queries (uniform attention, a constant FFN output):
    the regime in which the queries of a trained model merged into one vector (docs/results.md)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for aggregator in vm.method.aggregators:
            for block in aggregator.blocks:
                for attention in (block.self_attn, block.visual_attn, block.text_attn):
                    attention.q.weight.zero_()
                    attention.q.bias.zero_()
                last = block.ffn[-1]
                last.weight.zero_()
                last.bias.copy_(50 * torch.randn(last.bias.shape, generator=g))
    return vm


def test_queries_re_added_in_every_block_survive_shared_updates():
    merged = _attention_row_spread(_force_shared_block_updates(build(wake=False, query_every_block=False)))
    kept = _attention_row_spread(_force_shared_block_updates(build(wake=False)))
    assert merged < 0.05
    assert kept > 10 * merged


# ---- shapes, masks, batches --------------------------------------------------------------------------------------
def test_same_number_of_tokens_for_1_8_and_32_frames():
    vm = build(frames=32, top_k=48)
    counts = {}
    for t in (1, 8, 32):
        ids, mask, _ = questions(vm, 1)
        ctx = vm.encode_video(random_features(1, frames=t), input_ids=ids, attention_mask=mask)
        counts[t] = ctx.num_tokens
        assert ctx.mask is None or bool(ctx.mask.all())
    assert set(counts.values()) == {vm.method.num_output_tokens} == {6}


def test_a_padded_video_encodes_like_the_video_alone():
    vm = build()
    feats = random_features(1, frames=3)
    padded = torch.cat([feats, torch.full((1, 1, 4, DV), 50.0)], dim=1)
    alone = tokenize(vm, feats).tokens
    masked = tokenize(vm, padded, torch.tensor([[True, True, True, False]])).tokens
    torch.testing.assert_close(masked, alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="frame_mask"):
        tokenize(vm, padded, torch.zeros(1, 4, dtype=torch.bool))


def test_one_video_for_several_questions_is_that_video_for_each():
    vm = build()
    feats = random_features(1, frames=4)
    ids, mask, _ = questions(vm, 2)
    both = vm.encode_video(feats, input_ids=ids, attention_mask=mask)
    assert both.batch_size == 2
    for i in range(2):
        one = vm.encode_video(feats, input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1])
        torch.testing.assert_close(both.embeds[i], one.embeds[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reads_question", [False, True])
def test_the_context_reads_the_question_and_never_the_answer(reads_question):
    vm = build(scorer_reads_question=reads_question)
    feats = random_features(2, frames=4)
    contexts = []
    for answers in (["red", "left"], ["green", "up"]):
        ids, mask, labels = questions(vm, 2, answers=answers)
        contexts.append(vm.encode_video(feats, input_ids=ids, attention_mask=mask, labels=labels).embeds)
    torch.testing.assert_close(contexts[0], contexts[1], rtol=0, atol=0)
    ids, mask, _ = questions(vm, 2)
    swapped = vm.encode_video(feats, input_ids=ids.flip(0), attention_mask=mask.flip(0)).embeds
    assert not torch.allclose(swapped, contexts[0])  # another question, another context


def test_only_a_scorer_that_reads_the_question_scores_by_it():
    feats = random_features(1, frames=4)
    for reads_question in (False, True):
        vm = build(scorer_reads_question=reads_question)
        scores = [tokenize(vm, feats, n_questions=1).scores]
        ids, mask, _ = questions(vm, 2)
        cond = vm._conditioning(1, ids[1:], mask[1:], None, None)
        scores.append(vm.method.tokenize(feats, None, cond).scores)
        assert torch.equal(scores[0], scores[1]) is not reads_question
    # Without question tokens the scorer's question read adds nothing (it is not fed a padding position).
    vm = build(scorer_reads_question=True)
    unasked = vm.method.tokenize(feats, None, None).scores
    for layer in vm.method.scorer.layers:
        layer.text = None
    torch.testing.assert_close(unasked, vm.method.tokenize(feats, None, None).scores, rtol=0, atol=0)


# ---- starting from a saved llava adapter ---------------------------------------------------------------------
def _saved_llava(tmp_path, vm: VideoModel, num_frames: int = 4, **options):
    config = VideoAdapterConfig(method="llava", vision_hidden_size=DV, num_frames=num_frames, options=options)
    torch.manual_seed(5)
    llava = wrap_model(vm.llm, config, tokenizer=vm.tokenizer)
    with torch.no_grad():
        for p in llava.method.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    llava.save_pretrained(tmp_path / "llava")
    return llava, tmp_path / "llava"


def test_starting_from_a_llava_adapter_reproduces_its_frame_tokens_on_one_frame(tmp_path):
    vm = build(scale_queries=[8, 4, 2], scale_windows=[1, 2, 4], freeze_projector=True)
    llava, directory = _saved_llava(tmp_path, vm)
    vm.method.init_projector_from(directory)
    image = random_features(1, frames=1, seed=3)  # P' = 4 frame tokens
    frame_tokens = llava.encode_video(image).embeds[0]
    ids, mask, _ = questions(vm, 1)
    tokens = vm.encode_video(image, input_ids=ids, attention_mask=mask).embeds[0]
    assert tokens.shape[0] == 14
    # Scales with at least P' slots: slot i is frame token floor(i P' / n), exactly (every token, in order).
    torch.testing.assert_close(tokens[:8], frame_tokens[torch.arange(8) * 4 // 8], rtol=0, atol=0)
    torch.testing.assert_close(tokens[8:12], frame_tokens, rtol=0, atol=0)
    # A scale with fewer slots than tokens averages contiguous windows of them.
    window_weights = tokenize(vm, image).aggregation[2][0]
    assert (window_weights > 0).tolist() == [[True, True, False, False], [False, False, True, True]]
    torch.testing.assert_close(tokens[12:], window_weights @ frame_tokens, rtol=1e-6, atol=1e-7)


def test_a_frozen_projector_stays_put_and_travels_with_the_adapter(tmp_path):
    vm = build(freeze_projector=True, wake=False)
    llava, directory = _saved_llava(tmp_path, vm)
    vm.method.init_projector_from(directory)
    names = {n for n, _ in vm.method.named_parameters()}
    assert not any(n.startswith("frame_tokenizer.projector") for n in names)
    assert "frame_tokenizer.temporal.weight" in names  # the per-frame embedding still trains
    state = vm.adapter_state_dict()
    torch.testing.assert_close(state["frame_tokenizer.projector.0.weight"], llava.method.projector[0].weight)
    vm.set_stage("sft")
    opt = torch.optim.AdamW([p for p in vm.parameters() if p.requires_grad], lr=1e-2)
    ids, mask, labels = questions(vm, 2, answers=["red", "left"])
    vm(input_ids=ids, attention_mask=mask, labels=labels, videos=random_features(2, frames=4)).loss.backward()
    opt.step()
    torch.testing.assert_close(vm.method.frame_tokenizer.projector[2].weight, llava.method.projector[2].weight,
                               rtol=0, atol=0)
    vm.save_pretrained(tmp_path / "linvt")
    loaded = VideoModel.from_pretrained(vm.llm, tmp_path / "linvt", tokenizer=vm.tokenizer)  # the trained LLM
    assert not any(n.startswith("frame_tokenizer.projector") for n, _ in loaded.method.named_parameters())
    for name, tensor in vm.adapter_state_dict().items():
        torch.testing.assert_close(loaded.adapter_state_dict()[name], tensor, rtol=0, atol=0)


def test_per_frame_rows_past_the_adapters_frames_start_from_its_last_row(tmp_path):
    vm = build(frames=4)
    llava, directory = _saved_llava(tmp_path, vm, num_frames=2)
    vm.method.init_projector_from(directory)
    rows = vm.method.frame_tokenizer.temporal.weight
    theirs = llava.method.temporal.weight
    torch.testing.assert_close(rows[:2], theirs, rtol=0, atol=0)
    torch.testing.assert_close(rows[2:], theirs[1:].expand(2, -1), rtol=0, atol=0)


def test_adapters_that_do_not_fit_are_refused(tmp_path):
    vm = build()
    _, directory = _saved_llava(tmp_path, vm, spatial_pool=2)
    with pytest.raises(ValueError, match="options.spatial_pool"):
        vm.method.init_projector_from(directory)
    _, no_time = _saved_llava(tmp_path / "b", vm, temporal_embedding=False)
    with pytest.raises(ValueError, match="options.temporal_embedding"):
        vm.method.init_projector_from(no_time)
    vm.save_pretrained(tmp_path / "linvt")
    with pytest.raises(ValueError, match="expected a 'llava' frame adapter"):
        vm.method.init_projector_from(tmp_path / "linvt")
    with pytest.raises(FileNotFoundError):
        vm.method.init_projector_from(tmp_path / "nowhere")
    wide = VideoAdapterConfig(method="llava", vision_hidden_size=DV + 1, num_frames=4)
    wrap_model(vm.llm, wide, tokenizer=vm.tokenizer).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="features 17 wide"):
        vm.method.init_projector_from(tmp_path / "wide")
    other = make_tiny_lm("gpt2", vocab_size=len(vm.tokenizer) + 8)
    wrap_model(other, VideoAdapterConfig(method="llava", vision_hidden_size=DV, num_frames=4),
               tokenizer=vm.tokenizer).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="was trained on a gpt2 LLM"):
        vm.method.init_projector_from(tmp_path / "gpt2")


# ---- options --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"scale_queries": [4]}, "options.scale_queries: 1 entries for 2 scale_windows"),
    ({"scale_windows": [], "scale_queries": []}, "options.scale_windows: at least one scale"),
    ({"num_heads": 3}, "options.num_heads: 3 does not divide hidden_dim 16"),
    ({"top_k": 0}, "options.top_k: must be >= 1"),
    ({"scale_windows": [1, 0]}, r"options.scale_windows\[1\]: must be >= 1"),
    ({"attention_mix_init": 1.5}, "options.attention_mix_init: must be <= 1"),
    ({"freeze_projector": "yes"}, "options.freeze_projector: expected a bool"),
])
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        VideoAdapterConfig(method="linvt", vision_hidden_size=DV, options={**SMALL, **options})


def test_registered_with_question_embeddings_only():
    assert LinvtMethod.needs == frozenset({"prompt", "prompt_embeds"})
    assert LinvtMethod.kind == "tokens"


def test_adapter_saved_before_query_every_block_loads_with_it_off(tmp_path):
    vm = build(query_every_block=False)
    path = vm.save_pretrained(tmp_path / "old")
    config_file = path / "adapter_config.json"
    payload = json.loads(config_file.read_text())
    del payload["adapter"]["options"]["query_every_block"]  # as written before the option existed
    config_file.write_text(json.dumps(payload))
    loaded = VideoModel.from_pretrained(vm.llm, path, tokenizer=vm.tokenizer)
    assert loaded.config.options["query_every_block"] is False
    feats = random_features(2, frames=4)
    torch.testing.assert_close(tokenize(loaded, feats).tokens, tokenize(vm, feats).tokens, rtol=0, atol=0)
    assert LinvtOptions().query_every_block is True  # new adapters get it
