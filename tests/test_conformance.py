"""The conformance battery: one table of checks that every registered method runs over the architecture matrix.

A new method joins by being registered (built-in, or inside the tests as ``conformance_methods`` does); if it
needs small settings or helper models to run fast, add them to ``SETTINGS``. Checks:
text-only calls are untouched; identity at birth (where the method promises it); batch invariance; save/load
round trip; generate agrees with forward; no dead parameters within two optimiser steps; gradient checkpointing
(both modes) gives the plain gradients; a bf16 LLM trains.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

import conformance_methods  # noqa: F401  (registers the methods defined in the tests)
from conftest import DV, WORDS, random_features
from tiny_models import make_tiny_dual_encoder, make_tiny_lm
from video2param import VideoAdapterConfig, VideoModel, available_methods, wrap_model
from video2param.data.tokenizer import build_word_tokenizer
from video2param.methods.base import get_method

ARCHS = ["llama", "gpt2", "phi3", "opt"]
FRAMES = 4
# Small settings per method (common config fields; options under "options"). Unlisted methods use DEFAULT.
DEFAULT: dict[str, Any] = {"rank": 4, "inject_every": 2}
SETTINGS: dict[str, dict[str, Any]] = {
    "vipe": {"rank": 4, "inject_every": 2, "options": {"hidden_dim": 16, "depth": 2, "num_heads": 2}},
    "pooled_delta_test": {"rank": 2, "inject_every": 2},
    "video2lora": {"rank": 2, "inject_every": 2, "options": {"latent_dim": 16, "num_latents": 4, "depth": 2,
                   "num_heads": 2, "head_dim": 8, "kv_heads": 1, "ffn_mult": 2, "input_mult": 2, "head_hidden": 32}},
    "ppllava": {"options": {"kernel": [2, 2, 2], "text_keep_positions": 2, "extra_output_sizes": [[4, 1, 1]]}},
    "linvt": {"options": {"hidden_dim": 16, "num_heads": 2, "scorer_layers": 1, "top_k": 10, "scale_queries": [4, 2],
                          "scale_windows": [1, 2], "scorer_reads_question": True}},
}
METHODS = available_methods()
PROMPTS = ["<video> what colour is the object ?", "<video> which way does it move ?", "<video> what shape ?"]


def _tokenizer():
    tok = build_word_tokenizer(WORDS)
    tok.add_tokens(["<video>"], special_tokens=True)
    return tok


_TEACHERS = tempfile.TemporaryDirectory(prefix="v2p-conformance-teachers-")  # removed at interpreter exit


def _llava_teacher(llm, tok, arch: str, dtype: torch.dtype) -> dict[str, Any]:
    """A saved llava adapter on this LLM: methods that learn from a teacher record it and from_pretrained reloads it."""
    directory = Path(_TEACHERS.name) / f"llava-{arch}-{str(dtype).replace('torch.', '')}"
    if not directory.exists():
        torch.manual_seed(123)
        teacher = wrap_model(llm, VideoAdapterConfig(method="llava", vision_hidden_size=DV, num_frames=FRAMES),
                             tokenizer=tok)
        teacher.save_pretrained(directory)
    return {"teacher": str(directory)}


def _tiny_clip(llm, tok, arch: str, dtype: torch.dtype) -> dict[str, Any]:
    """A tiny CLIP dual encoder (2×2 patches of width DV, the same weights every time) as the vision tower."""
    return {"vision": make_tiny_dual_encoder("clip", vision_width=DV, grid=2)}


# Helper models per method: (llm, tokenizer, arch, dtype) → extra wrap_model keyword arguments.
HELPERS = {"video2lora": _llava_teacher, "ppllava": _tiny_clip}


def build(method: str, arch: str, *, dtype=torch.float32, seed: int = 0) -> tuple[VideoModel, Any]:
    """A wrapped tiny LM whose method parameters are all awake (no zero-initialised tensor left)."""
    tok = _tokenizer()
    llm = make_tiny_lm(arch, vocab_size=len(tok) + 8).to(dtype)
    helpers = HELPERS[method](llm, tok, arch, dtype) if method in HELPERS else {}
    torch.manual_seed(seed)
    settings = {**SETTINGS.get(method, DEFAULT)}
    config = VideoAdapterConfig(method=method, vision_hidden_size=DV, num_frames=FRAMES, **settings)
    return wrap_model(llm, config, tokenizer=tok, **helpers), tok


def wake(vm: VideoModel, seed: int = 1) -> VideoModel:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vm.method.parameters():
            p.add_((torch.randn(p.shape, generator=g) * 0.2).to(p.dtype))
    return vm


def batch(tok, n: int = 3, answers: bool = False):
    tok.padding_side = "left"
    texts = [p + (" red" if answers else "") for p in PROMPTS[:n]]
    enc = tok(texts, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = None
    if answers:
        labels = torch.full_like(ids, -100)
        labels[:, -1] = ids[:, -1]
    return ids, mask, labels


cases = pytest.mark.parametrize("arch", ARCHS)
methods = pytest.mark.parametrize("method", METHODS)


@methods
@cases
def test_text_only_calls_are_untouched(method, arch):
    vm, tok = build(method, arch)
    wake(vm)
    enc = tok(["what colour is the object ?"], return_tensors="pt")
    expected = make_tiny_lm(arch, vocab_size=len(tok) + 8)(**enc).logits
    assert torch.equal(vm(**enc).logits, expected)


@methods
@cases
def test_identity_at_birth(method, arch):
    if not get_method(method).identity_at_birth:
        pytest.skip(f"{method} does not promise identity at birth")
    vm, tok = build(method, arch)
    ids, mask, _ = batch(tok)
    base = vm.llm
    with_video = vm(input_ids=ids, attention_mask=mask, videos=random_features(3, frames=FRAMES)).logits
    stripped = tok([p.replace("<video> ", "") for p in PROMPTS], return_tensors="pt", padding=True)
    torch.testing.assert_close(with_video, vm(**stripped).logits, rtol=0, atol=0)
    assert base is vm.llm


@methods
@cases
def test_batch_invariance(method, arch):
    vm = wake(build(method, arch)[0])
    tok = vm.tokenizer
    # Right padding, as in training: an HF forward with left padding shifts absolute positions (GPT-2, OPT) by
    # itself; generate computes positions from the mask and is covered by the generate check.
    tok.padding_side = "right"
    feats = random_features(3, frames=FRAMES)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    together = vm(**enc, videos=feats).logits
    for i in range(3):
        one = tok([PROMPTS[i]], return_tensors="pt")
        alone = vm(**one, videos=feats[i : i + 1]).logits[0]
        n = alone.shape[0]
        # float32 sums over other batch shapes: ~3e-5 on logits of ~0.3 (gpt2 + vipe); a leak between samples
        # shows at the size of the video's effect, orders of magnitude above.
        torch.testing.assert_close(together[i, :n], alone, rtol=1e-4, atol=1e-4)


@methods
@cases
def test_save_load_round_trip(method, arch, tmp_path):
    vm, tok = build(method, arch)
    wake(vm)
    ids, mask, _ = batch(tok)
    feats = random_features(3, frames=FRAMES)
    expected = vm(input_ids=ids, attention_mask=mask, videos=feats).logits
    vm.save_pretrained(tmp_path / "adapter")
    fresh = make_tiny_lm(arch, vocab_size=len(tok) + 8)
    helpers = HELPERS[method](fresh, tok, arch, torch.float32) if method in HELPERS else {}
    loaded = VideoModel.from_pretrained(fresh, tmp_path / "adapter", tokenizer=tok, **helpers)
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask, videos=feats).logits, expected)


@methods
@cases
def test_generate_agrees_with_forward(method, arch):
    vm = wake(build(method, arch)[0])
    tok = vm.tokenizer
    ids, mask, _ = batch(tok, n=2)
    feats = random_features(2, frames=FRAMES)
    # A random LM may pick the mark (it cannot be fed back) or EOS (generate then pads the rest): forbid both.
    never = [vm.video_token_id, vm.llm.config.eos_token_id]
    out = vm.generate(input_ids=ids, attention_mask=mask, videos=feats, max_new_tokens=3, do_sample=False,
                      suppress_tokens=never)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    new = out[:, ids.shape[1]:]
    full_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    logits = vm(input_ids=out, attention_mask=full_mask, videos=feats,
                prompt_mask=torch.cat([mask, torch.zeros_like(new)], dim=1)).logits
    logits[..., never] = float("-inf")
    predicted = logits[:, -new.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(predicted, new)


@methods
@cases
def test_no_dead_parameters(method, arch):
    vm, tok = build(method, arch)
    ids, mask, labels = batch(tok, answers=True)
    feats = random_features(3, frames=FRAMES)
    params = {n: p for n, p in vm.method.named_parameters() if p.requires_grad}
    assert params, f"{method} has no trainable parameters"
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    moved = set()
    for _ in range(2):
        opt.zero_grad()
        vm(input_ids=ids, attention_mask=mask, videos=feats, labels=labels).loss.backward()
        moved |= {n for n, p in params.items() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
        opt.step()
    dead = sorted(set(params) - moved)
    assert not dead, f"parameters without gradient in two steps: {dead}"


@methods
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradient_checkpointing(method, arch, reentrant):
    def grads(checkpointing: bool):
        vm, tok = build(method, arch)
        vm.set_stage("sft")
        wake(vm)
        vm.train()
        if checkpointing:
            vm.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        ids, mask, labels = batch(tok, answers=True)
        vm(input_ids=ids, attention_mask=mask, videos=random_features(3, frames=FRAMES), labels=labels).loss.backward()
        return {n: p.grad for n, p in vm.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    for name, g in plain.items():
        if g is None:
            continue
        assert checkpointed[name] is not None, f"{name}: no gradient under checkpointing"
        # fp32 reduction order differs in the recomputed graph (embedding grads ~1e-5); a lost delta is O(1).
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")


@methods
def test_bf16_llm_trains(method):
    vm, tok = build(method, "llama", dtype=torch.bfloat16)
    wake(vm)
    ids, mask, labels = batch(tok, answers=True)
    out = vm(input_ids=ids, attention_mask=mask, videos=random_features(3, frames=FRAMES), labels=labels)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in vm.method.parameters() if p.requires_grad]
    assert any(g is not None and bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0) for g in grads)
