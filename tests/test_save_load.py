"""Adapter directory: save → load → same logits; tampered files give errors naming the problem."""

import json

import pytest
import torch
from conftest import DV, encode, random_features
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_lm

from video2param import AdapterMismatchError, VideoModel, wrap_model


def _trained_like(vm):
    # Give every adapter tensor a non-trivial value so the round trip is meaningful (vipe's W_l starts at zero).
    with torch.no_grad():
        for p in vm.method.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vm


@pytest.mark.parametrize("method", ["llava", "vipe"])
def test_save_load_same_logits(tmp_path, tokenizer, method):
    opts = {"hidden_dim": 32, "num_heads": 4, "depth": 2} if method == "vipe" else {}
    llm = make_tiny_lm("llama", vocab_size=len(tokenizer) + 8)
    vm = _trained_like(wrap_model(llm, method=method, vision_hidden_size=DV, num_frames=4, rank=4, inject_every=2,
                                  tokenizer=tokenizer, **opts))
    ids, mask = encode(tokenizer, ["<video> what colour ?"])
    feats = random_features(1)
    vm.eval()
    expected = vm(input_ids=ids, attention_mask=mask, videos=feats).logits
    out = vm.save_pretrained(tmp_path / "adapter", metrics={"static": 0.5})
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert "llama" in (out / "README.md").read_text()
    llm = vm.unwrap()
    vm2 = VideoModel.from_pretrained(llm, out, tokenizer=tokenizer)
    vm2.eval()
    assert torch.equal(vm2(input_ids=ids, attention_mask=mask, videos=feats).logits, expected)


def _saved(tmp_path, tokenizer):
    llm = make_tiny_lm("llama", vocab_size=len(tokenizer) + 8)
    vm = wrap_model(llm, method="vipe", vision_hidden_size=DV, num_frames=4, rank=4, hidden_dim=32, num_heads=4,
                    depth=1, tokenizer=tokenizer)
    path = vm.save_pretrained(tmp_path / "adapter")
    return vm.unwrap(), path


def test_missing_and_unexpected_tensors(tmp_path, tokenizer):
    llm, path = _saved(tmp_path, tokenizer)
    state = load_file(str(path / "adapter_model.safetensors"))
    dropped = sorted(state)[0]
    del state[dropped]
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterMismatchError, match=rf"missing tensors: {dropped}.*unexpected tensors: extra.weight"):
        VideoModel.from_pretrained(llm, path, tokenizer=tokenizer)


def test_wrong_shape(tmp_path, tokenizer):
    llm, path = _saved(tmp_path, tokenizer)
    state = load_file(str(path / "adapter_model.safetensors"))
    state["queries"] = torch.zeros(3, 32)
    save_file(state, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterMismatchError, match=r"wrong shapes: queries: adapter \(3, 32\) vs model \(4, 32\)"):
        VideoModel.from_pretrained(llm, path, tokenizer=tokenizer)


def test_corrupt_weights_and_config(tmp_path, tokenizer):
    llm, path = _saved(tmp_path, tokenizer)
    (path / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        VideoModel.from_pretrained(llm, path, tokenizer=tokenizer)
    (path / "adapter_config.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        VideoModel.from_pretrained(llm, path, tokenizer=tokenizer)
    (path / "adapter_config.json").write_text(json.dumps({"format_version": 99, "adapter": {}, "base_model": {}}))
    with pytest.raises(ValueError, match="format_version 99"):
        VideoModel.from_pretrained(llm, path, tokenizer=tokenizer)


def test_missing_directory(tmp_path, tokenizer):
    llm = make_tiny_lm("llama", vocab_size=len(tokenizer) + 8)
    with pytest.raises(FileNotFoundError):
        VideoModel.from_pretrained(llm, tmp_path / "nowhere", tokenizer=tokenizer)


def test_save_base_model_keeps_the_adapter_attached(tmp_path, tokenizer):
    import copy

    from transformers import AutoModelForCausalLM

    llm = make_tiny_lm("llama", vocab_size=len(tokenizer) + 8)
    vm = _trained_like(wrap_model(llm, method="vipe", vision_hidden_size=DV, num_frames=4, rank=4, inject_every=2,
                                  hidden_dim=32, num_heads=4, depth=1, tokenizer=tokenizer, stage="sft"))
    ids, mask = encode(tokenizer, ["<video> what colour ?"])
    feats = random_features(1)
    before = vm(input_ids=ids, attention_mask=mask, videos=feats).logits
    vm.save_base_model(tmp_path / "lm")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    # (the reload picks its own attention kernel, hence allclose)
    assert torch.allclose(reloaded(input_ids=ids, attention_mask=mask).logits, vm.llm(input_ids=ids, attention_mask=mask).logits,
                          atol=1e-6)
    assert torch.equal(vm(input_ids=ids, attention_mask=mask, videos=feats).logits, before)
    twin = copy.deepcopy(vm)  # the merge lock is recreated, not copied
    assert torch.equal(twin(input_ids=ids, attention_mask=mask, videos=feats).logits, before)
