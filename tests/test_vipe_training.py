"""ViPE trains like a LoRA: the generated A moves at a LoRA's speed, a static attribute is learned at lr 1e-3,
saved adapters (also those saved before the training multipliers existed) load to the same deltas.

The root cause these guard against (docs/vipe-training.md): the A generator reads LayerNorm outputs of width
hidden_dim, so one Adam step used to move each entry of A by ~hidden_dim·lr instead of a LoRA's ~lr, and the
video-independent part of the delta swamped the video's.
"""

import json

import pytest
import torch
from conftest import DV, WORDS, random_features
from tiny_models import make_tiny_lm

from video2param import VideoModel, wrap_model
from video2param.data import PROMPT_WORDS, VideoQA, VideoQACollator, build_word_tokenizer, evaluate
from video2param.methods.vipe import GeneratorScaling, VipeOptions, nearest_power_of_two
from video2param.train import TrainConfig, train

TINY = dict(vision_hidden_size=DV, num_frames=4, rank=4, inject_every=2, num_heads=4, depth=1)
LEGACY = {"a_lr_ratio": 32.0, "w_l_lr_ratio": 1.0}  # multipliers 1: the parametrisation before the fix (width 32)
COLORS = ("red", "green", "blue")


def _a_step(vm, feats, lr: float = 1e-3) -> torch.Tensor:
    """Largest change of a generated A entry after one Adam step on the A generator alone."""
    params = list(vm.method.to_A.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    before = {k: d.A.detach().clone() for k, d in vm.method.encode(feats).deltas.items()}
    with torch.no_grad():  # a non-zero W_l, as after a few steps, so that A receives a gradient
        for p in vm.method.W_l.values():
            p.normal_(std=0.1)
    ctx = vm.method.encode(feats)
    sum((d.A * torch.randn_like(d.A)).sum() for d in ctx.deltas.values()).backward()
    opt.step()
    after = vm.method.encode(feats)
    return max((after.deltas[k].A.detach() - before[k]).abs().max() for k in before)


def test_an_adam_step_moves_a_like_a_lora_a(llama, tokenizer):
    feats = random_features(2)
    torch.manual_seed(0)
    fixed = wrap_model(llama, method="vipe", tokenizer=tokenizer, hidden_dim=32, **TINY)
    # A LoRA's A moves by lr per entry under Adam; the generated A now does too (up to the query norm's spread).
    assert _a_step(fixed, feats) < 2e-3
    torch.manual_seed(0)
    legacy = wrap_model(make_tiny_lm("llama", vocab_size=len(tokenizer) + 8), method="vipe", tokenizer=tokenizer,
                        hidden_dim=32, **TINY, **LEGACY)
    assert _a_step(legacy, feats) > 8e-3  # ~hidden_dim·lr: the collapse at lr >= 1e-3


def test_fresh_generated_a_has_lora_scale(llama, tokenizer):
    vm = wrap_model(llama, method="vipe", tokenizer=tokenizer, hidden_dim=32, **TINY)
    ctx = vm.method.encode(random_features(2))
    rows = torch.cat([d.A.norm(dim=-1).flatten() for d in ctx.deltas.values()])
    assert 0.5 < rows.mean() < 2.0  # rows of norm ~1: x·Aᵀ of order |x|, like a LoRA A at init
    assert all(torch.count_nonzero(d.B) == 0 for d in ctx.deltas.values())  # still the identity at birth


def test_multipliers_are_powers_of_two_and_follow_the_options():
    assert nearest_power_of_two(0.1) == 0.125 and nearest_power_of_two(1 / 96) == 1 / 128
    scaling = GeneratorScaling.from_options(VipeOptions(hidden_dim=128), 128)
    assert scaling == GeneratorScaling(to_A=1 / 128, W_l=1.0)
    assert GeneratorScaling.from_options(VipeOptions(w_l_lr_ratio=0.1), 128).W_l == 0.125
    assert GeneratorScaling.from_options(VipeOptions(a_lr_ratio=128.0, w_l_lr_ratio=1.0), 128) == GeneratorScaling(1.0, 1.0)
    with pytest.raises(ValueError, match="options.w_l_lr_ratio"):
        VipeOptions(w_l_lr_ratio=0.0)


@pytest.mark.parametrize("width, heads, expected", [(96, 8, 96), (100, 8, 96), (4096, 8, 512), (32, 4, 32), (4, 8, 8)])
def test_default_width_follows_the_llm(width, heads, expected):
    assert VipeOptions(num_heads=heads).resolved_hidden_dim(width) == expected
    assert VipeOptions(hidden_dim=64, num_heads=heads).resolved_hidden_dim(width) == 64


def test_default_module_is_no_wider_than_the_llm(llama, tokenizer):
    vm = wrap_model(llama, method="vipe", tokenizer=tokenizer, **TINY)
    assert vm.config.options["hidden_dim"] is None  # recorded as "follow the LLM", resolved on the same base
    assert vm.method.hidden_dim == llama.config.hidden_size == vm.method.queries.shape[1]


def test_state_dict_holds_the_effective_matrices(llama, tokenizer):
    vm = wrap_model(llama, method="vipe", tokenizer=tokenizer, hidden_dim=32, **TINY)
    with torch.no_grad():
        for p in vm.method.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = vm.adapter_state_dict()
    for key, matrix in vm.method.effective_generators().items():
        assert torch.equal(state[key], matrix)
    name = next(iter(vm.method.W_l))
    assert torch.equal(state[f"W_l.{name}"], vm.method.W_l[name].detach() * vm.method.scaling.W_l)
    # Load → the same parameters, bit for bit (power-of-two multipliers).
    before = {k: v.detach().clone() for k, v in vm.method.named_parameters()}
    vm.method.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in vm.method.named_parameters())


def test_adapter_saved_before_the_multipliers_loads_to_the_same_deltas(tmp_path, tokenizer):
    """An adapter saved by the original parametrisation (no lr-ratio options in its JSON) gives the same deltas."""
    llm = make_tiny_lm("llama", vocab_size=len(tokenizer) + 8)
    old = wrap_model(llm, method="vipe", tokenizer=tokenizer, hidden_dim=32, **TINY, **LEGACY)
    with torch.no_grad():
        for p in old.method.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    feats = random_features(2)
    expected = old.method.encode(feats)
    path = old.save_pretrained(tmp_path / "adapter")
    config_file = path / "adapter_config.json"
    payload = json.loads(config_file.read_text())
    for key in LEGACY:  # what the file looked like before the options existed
        del payload["adapter"]["options"][key]
    config_file.write_text(json.dumps(payload))
    new = VideoModel.from_pretrained(old.unwrap(), path, tokenizer=tokenizer)
    assert new.method.scaling == GeneratorScaling(to_A=1 / 32, W_l=1.0)  # today's defaults
    got = new.method.encode(feats)
    for key, delta in expected.deltas.items():
        assert torch.allclose(got.deltas[key].A, delta.A, atol=1e-6)
        assert torch.equal(got.deltas[key].B, delta.B)


def test_answers_do_not_depend_on_batch_mates(llama, tokenizer):
    vm = wrap_model(llama, method="vipe", tokenizer=tokenizer, hidden_dim=32, **TINY)
    feats = random_features(3)
    together = vm.method.encode(feats)
    for i in range(3):
        alone = vm.method.encode(feats[i : i + 1])
        for key, delta in alone.deltas.items():
            assert torch.allclose(together.deltas[key].A[i], delta.A[0], atol=1e-5)


# ---- learning ----------------------------------------------------------------------------------------------------
def _dot_videos(n: int, seed: int) -> list[VideoQA]:
    """A coloured dot that jumps over a 2×2 patch grid for 4 frames; the question asks its colour."""
    colour_codes = torch.randn(len(COLORS), DV, generator=torch.Generator().manual_seed(1234))  # same in every split
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        c = i % len(COLORS)
        feats = 0.1 * torch.randn(4, 4, DV, generator=g)
        cells = torch.randint(4, (4,), generator=g)
        feats[torch.arange(4), cells] += colour_codes[c]
        items.append(VideoQA(feats, "what colour is the object?", COLORS[c], "color", "static"))
    return items


def test_vipe_learns_a_static_attribute_at_lr_1e_3():
    """Stage sft, AdamW at lr 1e-3, default ViPE options (width and multipliers), every parameter trainable.

    The llava baseline needs about as many steps on this task (100% after 150 steps, measured when this test was
    written); the full lr × rank × stage sweep is benchmarks/vipe_sweep.py (docs/vipe-training.md).
    """
    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(WORDS + list(PROMPT_WORDS))
    vm = wrap_model(make_tiny_lm("llama", vocab_size=len(tokenizer) + 8), method="vipe", tokenizer=tokenizer,
                    vision_hidden_size=DV, num_frames=4, rank=8, inject_every=2, depth=1, stage="sft")
    train_set, test_set = _dot_videos(960, seed=0), _dot_videos(96, seed=1)
    collate = VideoQACollator(tokenizer, vm.video_token, train=True)
    result = train(vm, train_set, collate, TrainConfig(steps=100, batch_size=32, lr=1e-3, log_every=0,
                                                                   progress=False))
    accuracy = evaluate(vm, test_set, batch_size=96)["color"]
    assert accuracy >= 0.95, (accuracy, result.losses[-5:])
