"""A PEFT LoRA on the LLM beside the video adapter: trains in stage sft, coexists with the video deltas on one module
(either order of attaching), round-trips through save_pretrained / from_pretrained, and is a standard PEFT adapter."""

import json

import pytest
import torch
from conftest import DV, WORDS, encode, random_features
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import make_tiny_lm

from video2param import VideoModel, wrap_model
from video2param.data.tokenizer import build_word_tokenizer
from video2param.inject.lowrank import LowRankWrapper
from video2param.llm_lora import LORA_SUBDIR, attach_llm_lora, llm_lora_config, llm_lora_state_dict
from video2param.serialization import BaseModelFingerprint

VIPE = dict(method="vipe", vision_hidden_size=DV, num_frames=4, rank=4, inject_every=2, hidden_dim=32, num_heads=4,
            depth=1)
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


@pytest.fixture
def tok():
    return build_word_tokenizer(WORDS)


def _vocab(tok):
    return len(build_word_tokenizer(WORDS)) + 8  # fixed (wrap_model adds <video> to tok): room for it


def _lora(arch="llama", **kw):
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], **kw)


def _batch(tok, n=4):
    ids, mask = encode(tok, (["what colour is the object ? red", "which way does it move ? left"] * n)[:n], "right")
    return ids, mask, ids.masked_fill(mask == 0, -100), random_features(n, seed=1)


def _train(vm, tok, steps=3):
    ids, mask, labels, feats = _batch(tok)
    opt = torch.optim.AdamW([p for p in vm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = vm(input_ids=ids, attention_mask=mask, labels=labels, videos=feats).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def _logits(vm, tok, videos=True):
    ids, mask, _, feats = _batch(tok)
    vm.eval()
    with torch.no_grad():
        return vm(input_ids=ids, attention_mask=mask, videos=feats if videos else None).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_and_vipe_train_together_and_round_trip(tmp_path, tok, arch, capsys):
    llm = make_tiny_lm(arch, vocab_size=_vocab(tok))
    base = {k: v.clone() for k, v in llm.state_dict().items()}
    vm = wrap_model(llm, tokenizer=tok, stage="sft", llm_lora=_lora(arch), **VIPE)
    # stage sft with a LoRA: the adapter and the LoRA train, the LLM's own weights stay frozen
    trainable = {n for n, p in vm.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("method.") or "lora_" in n for n in trainable)
    assert any("lora_" in n for n in trainable) and any(n.startswith("method.") for n in trainable)
    vm.print_trainable_parameters()
    printed = capsys.readouterr().out
    assert "vipe params:" in printed and "LLM LoRA params:" in printed
    site = vm.llm.get_submodule(vm.llm_info.sites[0].name)
    assert isinstance(site, LowRankWrapper) and type(site.base).__module__.startswith("peft.")

    _train(vm, tok)
    lora = llm_lora_state_dict(vm.llm)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())  # the LoRA did train
    plain = {k.replace(".base.", ".").replace(".base_layer.", "."): v for k, v in vm.llm.state_dict().items()
             if "lora_" not in k}
    assert all(torch.equal(plain[k], base[k]) for k in base if k in plain)  # the base weights did not
    expected = _logits(vm, tok)
    vm.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / LORA_SUBDIR / "adapter_model.safetensors").is_file()

    again = VideoModel.from_pretrained(make_tiny_lm(arch, vocab_size=_vocab(tok)), tmp_path / "adapter", tokenizer=tok)
    assert llm_lora_config(again.llm) is not None
    torch.testing.assert_close(_logits(again, tok), expected, rtol=0, atol=1e-6)


def test_both_orders_of_attaching_give_the_same_model(tok):
    lora = _lora(init_lora_weights=False)  # random B: the LoRA changes the outputs
    lora_first = wrap_model(get_peft_model(make_tiny_lm("llama", vocab_size=_vocab(tok)), lora), tokenizer=tok,
                            stage="sft", **VIPE)
    video_first = wrap_model(make_tiny_lm("llama", vocab_size=_vocab(tok)), tokenizer=tok, **VIPE)
    attach_llm_lora(video_first, lora)
    assert video_first.stage == "pretrain" and not any(p.requires_grad for n, p in video_first.llm.named_parameters())
    video_first.set_stage("sft")
    with torch.no_grad():
        for p in lora_first.method.parameters():
            p.normal_(0, 0.1)  # a video delta that is not zero
    video_first.method.load_state_dict(lora_first.method.state_dict())
    video_first.load_state_dict(lora_first.state_dict())  # same names: same LoRA weights too
    for vm in (lora_first, video_first):
        site = vm.llm.get_submodule("model.layers.0.self_attn.q_proj")
        assert isinstance(site, LowRankWrapper) and type(site.base).__module__.startswith("peft.")
    a, b = _logits(lora_first, tok), _logits(video_first, tok)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # both the LoRA and the video act on the output
    base = wrap_model(make_tiny_lm("llama", vocab_size=_vocab(tok)), tokenizer=tok, **VIPE)
    base.method.load_state_dict(lora_first.method.state_dict())
    assert not torch.allclose(_logits(base, tok), a)
    assert not torch.allclose(_logits(lora_first, tok, videos=False), a)


def test_the_saved_lora_is_a_standard_peft_adapter(tmp_path, tok):
    vm = wrap_model(make_tiny_lm("llama", vocab_size=_vocab(tok)), tokenizer=tok, stage="sft",
                    llm_lora=_lora(init_lora_weights=False), **VIPE)
    vm.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / LORA_SUBDIR / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == sorted(TARGETS["llama"])
    peft_model = PeftModel.from_pretrained(make_tiny_lm("llama", vocab_size=_vocab(tok)),
                                           tmp_path / "adapter" / LORA_SUBDIR)
    ids, mask, _, _ = _batch(tok)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(_logits(vm, tok, videos=False), expected, rtol=0, atol=1e-6)


def test_a_stage_one_adapter_loads_onto_a_lora_llm_and_the_fingerprint_ignores_the_lora(tmp_path, tok):
    llm = make_tiny_lm("llama", vocab_size=_vocab(tok))
    before = BaseModelFingerprint.of(llm)
    stage1 = wrap_model(llm, tokenizer=tok, **VIPE)
    stage1.save_pretrained(tmp_path / "stage1")
    assert not (tmp_path / "stage1" / LORA_SUBDIR).exists()
    peft_llm = get_peft_model(make_tiny_lm("llama", vocab_size=_vocab(tok)), _lora())
    assert BaseModelFingerprint.of(peft_llm.get_base_model()).weights_sample == before.weights_sample
    stage2 = VideoModel.from_pretrained(peft_llm, tmp_path / "stage1", tokenizer=tok, stage="sft")
    assert stage2.llm_info.site_keys == stage1.llm_info.site_keys  # the same site names, LoRA or not
    assert {n for n, p in stage2.llm.named_parameters() if p.requires_grad} == {
        n for n, _ in stage2.llm.named_parameters() if "lora_" in n}


def test_bad_lora_arguments_and_files_are_refused(tmp_path, tok):
    with pytest.raises(ValueError, match="llm_lora: expected a peft.LoraConfig"):
        wrap_model(make_tiny_lm("llama", vocab_size=_vocab(tok)), tokenizer=tok, llm_lora={"r": 4}, **VIPE)
    peft_llm = get_peft_model(make_tiny_lm("llama", vocab_size=_vocab(tok)), _lora())
    with pytest.raises(ValueError, match="already carries a LoRA"):
        wrap_model(peft_llm, tokenizer=tok, llm_lora=_lora(), **VIPE)
    vm = wrap_model(make_tiny_lm("llama", vocab_size=_vocab(tok)), tokenizer=tok, llm_lora=_lora(), **VIPE)
    with pytest.raises(ValueError, match="already carries a LoRA"):
        attach_llm_lora(vm, _lora())

    # A LoRA folder from another save (a save killed between the LoRA and the adapter files) is refused.
    vm.save_pretrained(tmp_path / "a")
    other = wrap_model(make_tiny_lm("llama", vocab_size=_vocab(tok)), tokenizer=tok,
                       llm_lora=_lora(init_lora_weights=False), **VIPE)
    other.save_pretrained(tmp_path / "b")
    (tmp_path / "a" / LORA_SUBDIR / "adapter_model.safetensors").write_bytes(
        (tmp_path / "b" / LORA_SUBDIR / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="not the file the video adapter was saved with"):
        VideoModel.from_pretrained(make_tiny_lm("llama", vocab_size=_vocab(tok)), tmp_path / "a", tokenizer=tok)

    # A LoRA that does not fit the model fails after wrapping: the LLM is handed back without LoRA or wrappers.
    path = tmp_path / "b" / LORA_SUBDIR / "adapter_config.json"
    config = json.loads(path.read_text())
    config["target_modules"] = ["q_proj", "k_proj", "v_proj", "down_proj"]
    path.write_text(json.dumps(config))
    llm = make_tiny_lm("llama", vocab_size=_vocab(tok))
    names = [n for n, _ in llm.named_modules()]
    with pytest.raises(ValueError, match="missing: .*k_proj"):
        VideoModel.from_pretrained(llm, tmp_path / "b", tokenizer=tok)
    assert [n for n, _ in llm.named_modules()] == names and not hasattr(llm, "peft_config")


def test_saving_without_a_lora_removes_the_lora_of_an_earlier_save(tmp_path, tok):
    with_lora = wrap_model(make_tiny_lm("llama", vocab_size=_vocab(tok)), tokenizer=tok, llm_lora=_lora(), **VIPE)
    with_lora.save_pretrained(tmp_path / "adapter")
    without = wrap_model(make_tiny_lm("llama", vocab_size=_vocab(tok)), tokenizer=tok, **VIPE)
    without.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / LORA_SUBDIR / "adapter_model.safetensors").exists()
    again = VideoModel.from_pretrained(make_tiny_lm("llama", vocab_size=_vocab(tok)), tmp_path / "adapter",
                                       tokenizer=tok)
    assert llm_lora_config(again.llm) is None


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_lora_and_the_adapter_the_same_gradients(tok, reentrant):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        vm = wrap_model(make_tiny_lm("llama", vocab_size=_vocab(tok)), tokenizer=tok, stage="sft",
                        llm_lora=_lora(init_lora_weights=False), **VIPE)
        if checkpointing:
            vm.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            if reentrant:
                vm.llm.enable_input_require_grads()  # the embeddings are frozen: give the checkpoints a grad input
        vm.train()
        ids, mask, labels, feats = _batch(tok)
        vm(input_ids=ids, attention_mask=mask, labels=labels, videos=feats).loss.backward()
        grads.append({n: p.grad for n, p in vm.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert any("lora_" in n for n in plain) and all(g is not None for g in checkpointed.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
