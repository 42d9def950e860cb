"""Video2LoRA: the teacher read-out, the hypernetwork's LoRA per video, segment composition, export, distillation."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from conftest import DV, WORDS, random_features
from peft import PeftModel
from tiny_models import make_tiny_lm

from video2param import VideoAdapterConfig, VideoModel, wrap_model
from video2param.data.tokenizer import build_word_tokenizer
from video2param.distill import (
    DistillConfig,
    Distiller,
    DistillTrainer,
    answer_logits,
    distill,
    distill_training_arguments,
    forward_kl,
    teacher_answers,
    with_answers,
)
from video2param.methods.base import WeightContext
from video2param.methods.video2lora import Video2LoRAMethod, Video2LoRAOptions

FRAMES = 4  # training length = segment length
SMALL = {"latent_dim": 16, "num_latents": 4, "depth": 2, "num_heads": 2, "head_dim": 8, "kv_heads": 1,
         "ffn_mult": 2, "input_mult": 2, "head_hidden": 32, "instruction": "what is the object ?"}
PROMPTS = ["<video> what colour is the object ?", "<video> which way does it move ?", "<video> what shape ?"]


def _tokenizer():
    tok = build_word_tokenizer(WORDS)
    tok.add_tokens(["<video>"], special_tokens=True)
    return tok


def build(arch: str = "llama", *, rank: int = 2, inject_every: int = 2, teacher: bool = True, **options):
    """(student, teacher, tokenizer) on one tiny LM; the student's method is awake (B scalers no longer zero)."""
    tok = _tokenizer()
    llm = make_tiny_lm(arch, vocab_size=len(tok) + 8)
    torch.manual_seed(0)
    llava = wrap_model(llm, VideoAdapterConfig(method="llava", vision_hidden_size=DV, num_frames=FRAMES), tokenizer=tok)
    config = VideoAdapterConfig(method="video2lora", vision_hidden_size=DV, num_frames=FRAMES, rank=rank,
                                inject_every=inject_every, options={**SMALL, **options})
    vm = wrap_model(llm, config, tokenizer=tok, teacher=llava if teacher else None)
    return vm, llava, tok


def wake(vm, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vm.method.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return vm.eval()


def prompts(tok, n=3, side="right"):
    tok.padding_side = side
    enc = tok(PROMPTS[:n], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def _dense(context: WeightContext, key: str, sample: int = 0) -> torch.Tensor:
    return context.deltas[key].delta_weight(sample)


# ---- the method's promises -----------------------------------------------------------------------------------
def test_fresh_adapter_is_the_identity_and_defaults_follow_the_public_code():
    vm, _, tok = build()
    ids, mask = prompts(tok)
    with torch.no_grad():
        with_video = vm(input_ids=ids, attention_mask=mask, videos=random_features(3)).logits
        stripped = tok([p.replace("<video> ", "") for p in PROMPTS], return_tensors="pt", padding=True)
        assert torch.equal(with_video, vm(**stripped).logits)
    opt = Video2LoRAOptions()
    assert (opt.latent_dim, opt.num_latents, opt.depth, opt.num_heads, opt.head_dim, opt.kv_heads) == (512, 8, 9, 16,
                                                                                                        128, 4)
    assert opt.instruction == "Internalize this video for later captioning."
    cfg = VideoAdapterConfig(method="video2lora", vision_hidden_size=DV, num_frames=FRAMES, rank=16)
    big = wrap_model(make_tiny_lm("llama", vocab_size=len(tok) + 8), cfg, tokenizer=tok)
    assert big.method.delta_scale == 128.0  # 2·r^1.5 at r = 16, used as is
    alpha = VideoAdapterConfig(method="video2lora", vision_hidden_size=DV, num_frames=FRAMES, rank=4, alpha=8.0,
                               options={**SMALL, "scale_rule": "alpha/r"})
    assert wrap_model(make_tiny_lm("llama", vocab_size=len(tok) + 8), alpha, tokenizer=tok).method.delta_scale == 2.0


def test_context_shapes_per_sample_and_the_bias_lora_appended_once():
    vm, _, _ = wake(build()[0]), None, None
    ctx = vm.encode_video(random_features(2, frames=2 * FRAMES))  # two segments
    r = vm.config.rank
    for key, d in ctx.deltas.items():
        d_in, d_out = vm._site_layout[key]
        assert d.A.shape == (2, 3 * r, d_in) and d.B.shape == (2, d_out, 3 * r)  # per-sample A and B, 2 segments + bias
    generated, bias = vm.method.split_bias(ctx)
    for key in ctx.deltas:
        torch.testing.assert_close(bias.deltas[key].A[0], vm.method.bias_A[key.replace(".", "__")])
        torch.testing.assert_close(generated.deltas[key].A, ctx.deltas[key].A[:, :2 * r])


@pytest.mark.parametrize("positions", [True, False])
def test_hypernetwork_reads_the_order_of_the_readout_only_with_context_positions(positions):
    # The Perceiver's cross-attention reads a set: without position codes, reversing the read-out positions gives
    # the same LoRA, so frame order could reach it only through the LLM's causal mixing.
    vm = wake(build(context_positions=positions)[0])
    method = vm.method
    if positions:
        assert method.position_proj is not None
    else:
        assert method.position_proj is None and not any("position" in k for k in method.state_dict())
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, len(method._layers), 7, vm.llm.config.hidden_size, generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    with torch.no_grad():
        forward = method.hypernetwork(hidden, mask).factors
        reversed_ = method.hypernetwork(hidden.flip(2), mask).factors
    same = all(torch.allclose(forward[k][0], reversed_[k][0], atol=1e-5) for k in forward)
    assert same is (not positions)


def test_context_positions_start_at_zero_and_receive_a_gradient():
    vm = build()[0]
    assert torch.count_nonzero(vm.method.position_proj.weight) == 0  # a fresh hypernetwork is the public code's
    wake(vm).train()
    hidden = torch.randn(1, len(vm.method._layers), 5, vm.llm.config.hidden_size)
    factors = vm.method.hypernetwork(hidden, torch.ones(1, 5, dtype=torch.long)).factors
    sum(B.square().sum() for _, B in factors.values()).backward()
    assert vm.method.position_proj.weight.grad is not None and vm.method.position_proj.weight.grad.abs().sum() > 0


def test_question_time_input_is_the_prompt_alone():
    vm = wake(build()[0])
    tok = vm.tokenizer
    ids, mask = prompts(tok, n=1)
    ctx = vm.encode_video(random_features(1))
    seen = {}

    def record(module, args, kwargs):
        seen["input_ids"] = kwargs.get("input_ids")
        seen["inputs_embeds"] = kwargs.get("inputs_embeds")

    hook = vm.llm.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            vm(input_ids=ids, attention_mask=mask, context=ctx)
    finally:
        hook.remove()
    assert seen["inputs_embeds"] is None
    assert seen["input_ids"].shape[1] == ids.shape[1] - 1  # the question's tokens only: the mark stripped
    assert vm.video_token_id not in seen["input_ids"].tolist()[0]


def test_readout_runs_with_the_deltas_off_and_leaves_the_teacher_unchanged():
    vm, teacher, tok = build()
    wake(vm)
    ids, mask = prompts(tok)
    feats = random_features(3, seed=4)
    with torch.no_grad():
        before = teacher(input_ids=ids, attention_mask=mask, videos=feats).logits
        plain = vm.encode_video(feats)
        other = vm.encode_video(random_features(3, seed=9))
        with vm.use(other):  # another video's deltas active around the encode: the read-out must not see them
            inside = vm.encode_video(feats)
        after = teacher(input_ids=ids, attention_mask=mask, videos=feats).logits
    assert torch.equal(before, after)
    for key in plain.deltas:
        assert torch.equal(plain.deltas[key].A, inside.deltas[key].A)
        assert torch.equal(plain.deltas[key].B, inside.deltas[key].B)


def test_composition_of_segments_is_the_sum_of_their_deltas_plus_the_bias_once():
    vm = wake(build(inject_every=1)[0])
    feats = random_features(1, frames=3 * FRAMES, seed=5)
    with torch.no_grad():
        whole = vm.encode_video(feats)  # three segments composed
        parts = [vm.encode_video(feats[:, i * FRAMES:(i + 1) * FRAMES]) for i in range(3)]
        composed = vm.method.compose_contexts(parts)
    for key in whole.deltas:
        torch.testing.assert_close(whole.deltas[key].A, composed.deltas[key].A)
        torch.testing.assert_close(whole.deltas[key].B, composed.deltas[key].B)
        bias = _dense(vm.method.split_bias(parts[0])[1], key)
        expected = sum(_dense(vm.method.split_bias(p)[0], key) for p in parts) + bias
        torch.testing.assert_close(_dense(whole, key), expected, rtol=1e-5, atol=1e-6)
        assert bias.abs().max() > 0  # the bias LoRA is really there (awake), and counted once


def test_inference_writes_segments_in_place_and_matches_the_training_path():
    vm = wake(build(inject_every=1)[0])
    feats = random_features(2, frames=3 * FRAMES, seed=8)
    frame_mask = torch.ones(2, 3 * FRAMES, dtype=torch.bool)
    frame_mask[:, 2 * FRAMES:] = False  # a segment of padding for both videos: skipped, the buffer was wider
    for mask in (None, frame_mask):
        with torch.no_grad():
            streamed = vm.encode_video(feats, mask)
        trained = vm.encode_video(feats, mask)  # gradients on: the segments are concatenated
        for key, d in streamed.deltas.items():
            assert d.A.is_contiguous() and d.B.is_contiguous()
            torch.testing.assert_close(d.A, trained.deltas[key].A.detach(), rtol=0, atol=0)
            torch.testing.assert_close(d.B, trained.deltas[key].B.detach(), rtol=0, atol=0)


def test_per_sample_loras_in_one_batch_equal_each_alone_also_with_different_lengths():
    vm = wake(build(arch="gpt2")[0])
    tok = vm.tokenizer
    feats = random_features(3, frames=2 * FRAMES + 1, seed=6)  # 3 segments for the longest video
    lengths = [2 * FRAMES + 1, FRAMES - 1, FRAMES + 2]  # 3, 1 and 2 segments
    frame_mask = torch.zeros(3, feats.shape[1], dtype=torch.bool)
    for i, n in enumerate(lengths):
        frame_mask[i, :n] = True
    ids, mask = prompts(tok)
    left_ids, left_mask = prompts(tok, side="left")
    with torch.no_grad():
        together = vm(input_ids=ids, attention_mask=mask, videos=feats, frame_mask=frame_mask).logits
        out = vm.generate(input_ids=left_ids, attention_mask=left_mask, videos=feats, frame_mask=frame_mask, max_new_tokens=3,
                          do_sample=False, suppress_tokens=[vm.video_token_id, vm.llm.config.eos_token_id])
        batch_ctx = vm.encode_video(feats, frame_mask)
        for i, n in enumerate(lengths):
            one = tok([PROMPTS[i]], return_tensors="pt")
            video = feats[i:i + 1, :n]
            alone = vm(**one, videos=video).logits[0]
            torch.testing.assert_close(together[i, :alone.shape[0]], alone, rtol=1e-4, atol=1e-5)
            ctx = vm.encode_video(video)
            key = next(iter(ctx.deltas))
            torch.testing.assert_close(_dense(batch_ctx, key, i), _dense(ctx, key), rtol=1e-4, atol=1e-6)
            tok.padding_side = "left"
            single = vm.generate(**tok([PROMPTS[i]], return_tensors="pt"), context=ctx, max_new_tokens=3,
                                 do_sample=False, suppress_tokens=[vm.video_token_id, vm.llm.config.eos_token_id])
            assert torch.equal(single[0, -3:], out[i, -3:])


def test_export_peft_writes_the_composed_lora_and_peft_gives_the_same_logits(tmp_path):
    vm = wake(build(arch="llama", inject_every=1)[0])
    tok = vm.tokenizer
    video = random_features(1, frames=2 * FRAMES, seed=7)
    text = tok(["what colour is the object ?", "which way does it move ?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = vm(**text, videos=video).logits
        assert (expected - vm(**text).logits).abs().max() > 1e-3  # the video really changes the answer
    out = vm.export_peft(video, tmp_path / "lora")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 3 * vm.config.rank  # two segments + the bias LoRA
    peft_model = PeftModel.from_pretrained(make_tiny_lm("llama", vocab_size=len(tok) + 8), out).eval()
    with torch.no_grad():
        got = peft_model(**text).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---- the teacher -------------------------------------------------------------------------------------------------
def test_teacher_is_held_frozen_outside_the_state_dict_and_follows_to():
    vm, teacher, _ = build()
    assert vm.teacher is teacher
    assert all(k.startswith(("input_proj", "position_proj", "latents", "blocks", "final_norm", "queries",
                             "norm_queries", "decoder", "head", "scale_", "bias_")) for k in vm.adapter_state_dict())
    teacher_ids = {id(p) for p in teacher.method.parameters()}
    assert not teacher_ids & {id(p) for p in vm.parameters()}
    assert not any(p.requires_grad for p in teacher.method.parameters())
    vm.to(torch.float64)
    assert next(teacher.method.parameters()).dtype == torch.float64
    twin = copy.deepcopy(vm)  # the copy's teacher reads with the copy's LLM
    assert twin.teacher is not teacher and twin.teacher.llm is twin.llm


def test_saved_teacher_directory_is_recorded_and_reloaded(tmp_path):
    vm, teacher, tok = build()
    teacher.save_pretrained(tmp_path / "teacher")
    llm = vm.unwrap()
    student = wrap_model(llm, vm.config, tokenizer=tok, teacher=tmp_path / "teacher")
    assert student.config.options["teacher"] == str(tmp_path / "teacher")
    wake(student)
    feats = random_features(2)
    ids, mask = prompts(tok, n=2)
    with torch.no_grad():
        expected = student(input_ids=ids, attention_mask=mask, videos=feats).logits
    student.save_pretrained(tmp_path / "student")
    fresh = make_tiny_lm("llama", vocab_size=len(tok) + 8)
    loaded = VideoModel.from_pretrained(fresh, tmp_path / "student", tokenizer=tok)  # the teacher comes along
    assert loaded.teacher is not None and loaded.teacher.llm is fresh
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask, videos=feats).logits, expected)
    # Or given again, as a VideoModel on the new LLM.
    other = make_tiny_lm("llama", vocab_size=len(tok) + 8)
    given = VideoModel.from_pretrained(other, tmp_path / "teacher", tokenizer=tok)
    again = VideoModel.from_pretrained(other, tmp_path / "student", tokenizer=tok, teacher=given)
    assert again.teacher is given
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask, videos=feats).logits, expected)


def test_teacher_errors_are_clear(tmp_path):
    vm, teacher, tok = build(teacher=False)
    with pytest.raises(ValueError, match="learns from a teacher"):
        vm.encode_video(random_features(1))
    ctx_free = wrap_model(make_tiny_lm("llama", vocab_size=len(tok) + 8), vm.config, tokenizer=tok)
    with pytest.raises(ValueError, match="another LLM"):
        wrap_model(make_tiny_lm("llama", vocab_size=len(tok) + 8), vm.config, tokenizer=tok, teacher=teacher)
    with pytest.raises(ValueError, match="token adapter"):
        wrap_model(vm.unwrap(), vm.config, tokenizer=tok, teacher=ctx_free)
    with pytest.raises(ValueError, match="does not learn from a teacher"):
        wrap_model(make_tiny_lm("llama"), VideoAdapterConfig(method="llava", vision_hidden_size=DV), teacher=teacher)
    with pytest.raises(ValueError, match="expected a token VideoModel"):
        wrap_model(teacher.llm, vm.config, tokenizer=tok, teacher=42)
    with pytest.raises(FileNotFoundError):
        wrap_model(teacher.llm, vm.config, tokenizer=tok, teacher=tmp_path / "missing")
    wide = wrap_model(teacher.llm, VideoAdapterConfig(method="llava", vision_hidden_size=DV + 1), tokenizer=tok)
    with pytest.raises(ValueError, match="features"):
        wrap_model(teacher.llm, vm.config, tokenizer=tok, teacher=wide)


def test_options_and_instruction_are_checked():
    with pytest.raises(ValueError, match="kv_heads"):
        VideoAdapterConfig(method="video2lora", vision_hidden_size=DV, options={"num_heads": 6, "kv_heads": 4})
    with pytest.raises(ValueError, match="segment_frames"):
        VideoAdapterConfig(method="video2lora", vision_hidden_size=DV, options={"segment_frames": 0})
    vm = build(instruction="<video> twice")[0]
    with pytest.raises(ValueError, match="exactly once"):
        vm.encode_video(random_features(1))
    vm = build(chat_template=True)[0]
    with pytest.raises(ValueError, match="chat template"):
        vm.encode_video(random_features(1))
    vm.tokenizer.chat_template = "{% for m in messages %}<s> {{ m['content'] }} ?{% endfor %}"
    ids, _ = vm.method.readout_prompt(vm.tokenizer, 2, torch.device("cpu"))
    assert ids.shape[0] == 2 and (ids == vm.video_token_id).sum(dim=1).tolist() == [1, 1]
    assert ids[0, -1].item() == vm.tokenizer.convert_tokens_to_ids("?")


def test_instruction_is_read_with_the_model_tokenizer():
    vm = wake(build()[0])
    ids, mask = vm.method.readout_prompt(vm.tokenizer, 1, torch.device("cpu"))
    expected = vm.tokenizer("<video> " + SMALL["instruction"])["input_ids"]
    assert ids[0].tolist() == expected and bool(mask.all())
    a = vm.encode_video(random_features(1))
    other = wake(build(instruction="which way does it move ?")[0])
    b = other.encode_video(random_features(1))
    key = next(iter(a.deltas))
    assert not torch.allclose(a.deltas[key].A, b.deltas[key].A)  # the instruction is part of what is read


# ---- distillation --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Item:
    video: torch.Tensor
    question: str
    answer: str
    qtype: str = "colour"
    category: str = "static"


def _items(n=6, frames=FRAMES):
    feats = random_features(n, frames=frames, seed=11)
    questions = ["what colour is the object ?", "which way does it move ?", "what shape ?"]
    answers = ["red", "left", "up"]
    return [_Item(feats[i], questions[i % 3], answers[i % 3]) for i in range(n)]


def _collate(tok):
    from video2param.data.collate import VideoQACollator

    return VideoQACollator(tok, "<video>", train=True)


def test_distill_trains_only_the_hypernetwork():
    vm, teacher, tok = build()
    llm_before = {n: p.detach().clone() for n, p in vm.llm.named_parameters()}
    teacher_before = {n: p.detach().clone() for n, p in teacher.method.named_parameters()}
    method_before = {n: p.detach().clone() for n, p in vm.method.named_parameters()}
    cfg = DistillConfig(steps=3, batch_size=3, lr=1e-2, kl_weight=0.5, temperature=2.0, l1_weight=0.1, progress=False,
                        log_every=0)
    result = distill(vm, _items(), _collate(tok), cfg)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert all(torch.equal(p, llm_before[n]) for n, p in vm.llm.named_parameters())
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher.method.named_parameters())
    changed = [n for n, p in vm.method.named_parameters() if not torch.equal(p, method_before[n])]
    assert len(changed) == len(method_before)


def test_teacher_logits_are_aligned_with_the_answer_positions():
    vm, teacher, tok = build()
    batch = _collate(tok)(_items(3))  # one-word answers + eos: the same number of answer tokens per sample
    distiller = Distiller(vm, kl_weight=1.0)
    with torch.no_grad():
        logits = distiller.teacher_logits(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                          batch["videos"], None)
        _, targets, _ = answer_logits(torch.zeros(*batch["labels"].shape, 1), batch["labels"])
        ce = torch.nn.functional.cross_entropy(logits, targets)
        reference = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            videos=batch["videos"], labels=batch["labels"]).loss
    torch.testing.assert_close(ce, reference)


def test_loss_parts_add_up_and_forward_kl_is_the_tempered_kl():
    vm, _, tok = build()
    batch = _collate(tok)(_items(3))
    result = Distiller(vm, kl_weight=1.0, temperature=2.0, l1_weight=1.0).loss(batch)
    assert result.kl > 0 and result.l1 > 0 and torch.isfinite(result.total)
    torch.testing.assert_close(result.total.detach(), torch.tensor(result.ce + result.kl + result.l1))
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    rows = torch.tensor([0, 0, 0, 1, 1])  # sample 0 has 3 answer tokens, sample 1 has 2
    t = 2.0
    per_token = torch.nn.functional.kl_div(torch.log_softmax(student / t, -1), torch.log_softmax(teacher / t, -1),
                                           log_target=True, reduction="none").sum(-1)
    expected = (per_token[:3].mean() + per_token[3:].mean()) / 2 * t * t
    torch.testing.assert_close(forward_kl(teacher, student, rows, 2, t), expected)
    assert float(forward_kl(teacher, teacher, rows, 2, t)) == pytest.approx(0.0, abs=1e-6)


def test_distill_refuses_what_it_cannot_do():
    vm, teacher, tok = build(teacher=False)
    with pytest.raises(ValueError, match="teacher"):
        Distiller(vm, kl_weight=0.1)
    with pytest.raises(ValueError, match="weight-space"):
        Distiller(teacher)
    with pytest.raises(ValueError, match="lr"):
        DistillConfig(lr=0)
    with pytest.raises(ValueError, match="warmup_ratio"):
        DistillConfig(warmup_ratio=1.5)
    vm2, _, _ = build()
    batch = _collate(tok)(_items(2))
    batch["labels"][:] = -100
    with pytest.raises(ValueError, match="no answer token"):
        Distiller(vm2).loss(batch)


def test_teacher_answers_are_generated_once_and_cached(tmp_path):
    vm, teacher, tok = build()
    items = _items(4)
    cache = tmp_path / "answers.json"
    answers = teacher_answers(teacher, items, max_new_tokens=2, batch_size=3, cache=cache)
    assert len(answers) == 4 and cache.is_file()
    original = teacher.generate
    teacher.generate = lambda *a, **k: (_ for _ in ()).throw(AssertionError("generated again"))
    try:
        assert teacher_answers(teacher, items, max_new_tokens=2, cache=cache) == answers
    finally:
        teacher.generate = original
    with torch.no_grad():  # other teacher weights: the cache does not apply
        next(teacher.method.parameters()).add_(1.0)
    calls = []
    teacher.generate = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        teacher_answers(teacher, items, max_new_tokens=2, cache=cache)
    finally:
        teacher.generate = original
    assert calls
    relabelled = with_answers(items, answers)
    assert [it.answer for it in relabelled] == answers and relabelled[0].video is items[0].video
    with pytest.raises(ValueError, match="answers"):
        with_answers(items, answers[:2])
    with pytest.raises(ValueError, match="token adapter"):
        teacher_answers(vm, items)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_hf_trainer_distills_with_the_recipe(tmp_path, checkpointing):
    vm, teacher, tok = build()
    if checkpointing:
        vm.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    before = {n: p.detach().clone() for n, p in vm.method.named_parameters()}
    llm_before = {n: p.detach().clone() for n, p in vm.llm.named_parameters()}
    args = distill_training_arguments(tmp_path / "out", max_steps=2, per_device_train_batch_size=3, use_cpu=True,
                                      learning_rate=1e-2, save_strategy="no", logging_strategy="no")
    assert (args.weight_decay, args.warmup_steps, args.max_grad_norm, str(args.lr_scheduler_type)) == (
        0.01, 0.03, 1.0, "SchedulerType.COSINE")
    trainer = DistillTrainer(model=vm, args=args, train_dataset=_items(6), data_collator=_collate(tok),
                             kl_weight=0.05)
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in vm.method.named_parameters())
    assert all(torch.equal(p, llm_before[n]) for n, p in vm.llm.named_parameters())


def test_checkpointed_distillation_gives_the_plain_gradients():
    def grads(checkpointing):
        vm, _, tok = build()
        wake(vm).train()
        if checkpointing:
            vm.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        Distiller(vm, kl_weight=0.1).loss(_collate(tok)(_items(3))).total.backward()
        return {n: p.grad for n, p in vm.method.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_method_refuses_to_encode_without_the_model():
    vm = build()[0]
    with pytest.raises(ValueError, match="through VideoModel"):
        vm.method.encode(random_features(1))
    assert isinstance(vm.method, Video2LoRAMethod)


def test_adapter_saved_before_context_positions_loads_with_them_off(tmp_path):
    vm, teacher, tok = build(context_positions=False)
    wake(vm)
    feats = random_features(2)
    ids, mask = prompts(tok, n=2)
    with torch.no_grad():
        expected = vm(input_ids=ids, attention_mask=mask, videos=feats).logits
    path = vm.save_pretrained(tmp_path / "old")
    payload = json.loads((path / "adapter_config.json").read_text())
    del payload["adapter"]["options"]["context_positions"]  # as written before the option existed
    (path / "adapter_config.json").write_text(json.dumps(payload))
    teacher.save_pretrained(tmp_path / "teacher")
    fresh = make_tiny_lm("llama", vocab_size=len(tok) + 8)  # the same weights as the LM under vm
    loaded = VideoModel.from_pretrained(fresh, path, tokenizer=tok, teacher=tmp_path / "teacher")
    assert loaded.config.options["context_positions"] is False and loaded.method.position_proj is None
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask, videos=feats).logits, expected)
