"""PEFT export: one video's deltas → a standard LoRA that `PeftModel.from_pretrained` serves with the same logits."""

import json

import pytest
import torch
from conftest import DV, random_features
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from tiny_models import left_padded_batch, make_tiny_lm

from video2param import wrap_model
from video2param.export import export_peft, module_loras
from video2param.model import VideoModel


VIPE = dict(method="vipe", rank=4, inject_every=2, vision_hidden_size=DV, num_frames=4, hidden_dim=32, num_heads=4,
            depth=1)


def _trained_vipe(arch: str, seed: int = 0) -> VideoModel:
    """A ViPE model whose static W_l is non-zero, as after training (it starts at zero: identity)."""
    llm = make_tiny_lm(arch, seed=seed)
    torch.manual_seed(seed)  # the method's own init: the same model whatever ran before
    vm = wrap_model(llm, **VIPE)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in vm.method.W_l.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return vm.eval()


def _prompts():
    return left_padded_batch([7, 5], seed=3)  # two prompts, left padding: the LoRA must ignore the pad rows too


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "gpt_neox"])
def test_peft_model_reproduces_the_video_model(tmp_path, arch):
    vm = _trained_vipe(arch)
    video = random_features(1)
    ids, mask = _prompts()
    with torch.no_grad():
        expected = vm(input_ids=ids, attention_mask=mask, videos=video).logits
        text_only = vm(input_ids=ids, attention_mask=mask).logits
    assert (expected - text_only).abs().max() > 1e-2  # the video really changes the answer

    out = vm.export_peft(video, tmp_path / "lora")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    modules = sorted({s.name for s in vm.llm_info.sites})
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == modules
    assert config["r"] == config["lora_alpha"]  # PEFT scaling 1: the video's scale lives in lora_B
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    assert keys == {f"base_model.model.{m}.lora_{ab}.weight" for m in modules for ab in "AB"}

    peft_model = PeftModel.from_pretrained(make_tiny_lm(arch), out).eval()  # a fresh copy of the base model
    with torch.no_grad():
        got = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "phi3"])
def test_fused_module_lora_equals_the_merged_delta(arch):
    # Independent of PEFT: B A of each exported module must be exactly what merging the video adds to its weight.
    vm = _trained_vipe(arch)
    context = vm.encode_video(random_features(1))
    loras = module_loras(context, vm.llm_info.sites)
    fused = [lora for lora in loras.values() if len(lora.parts) > 1]
    assert fused, "the architecture should have a fused projection among its targets"
    for lora in fused:
        assert lora.rank == 4 * len(lora.parts)
    before = {name: vm.llm.get_submodule(name).base.weight.detach().clone() for name in loras}
    with vm.merged(context):
        for name, lora in loras.items():
            change = vm.llm.get_submodule(name).base.weight.detach() - before[name]
            if lora.transposed:
                change = change.T
            torch.testing.assert_close(lora.delta_weight(), change, atol=1e-6, rtol=1e-5)


def test_per_module_ranks_with_rank_pattern(tmp_path):
    vm = _trained_vipe("gpt2")
    video = random_features(1, seed=4)
    ids, mask = _prompts()
    with torch.no_grad():
        expected = vm(input_ids=ids, attention_mask=mask, videos=video).logits
    out = vm.export_peft(video, tmp_path / "lora", uniform_rank=False)
    state = load_file(str(out / "adapter_model.safetensors"))
    assert state["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (12, 32)  # q, k, v: 3 × 4
    assert state["base_model.model.transformer.h.0.attn.c_proj.lora_A.weight"].shape == (4, 32)
    config = LoraConfig.from_pretrained(str(out))
    assert config.r == 12 and config.rank_pattern[r"transformer\.h\.0\.mlp\.c_fc"] == 4
    assert config.alpha_pattern == config.rank_pattern
    peft_model = PeftModel.from_pretrained(make_tiny_lm("gpt2"), out).eval()
    with torch.no_grad():
        # PEFT adds each module's delta as one rank-12 product, the video model per role: fp32 order differs
        torch.testing.assert_close(peft_model(input_ids=ids, attention_mask=mask).logits, expected,
                                   atol=5e-5, rtol=1e-5)


def test_ready_context_and_dtype(tmp_path):
    vm = _trained_vipe("llama")
    videos = random_features(2, seed=5)
    with torch.no_grad():
        both = vm.encode_video(videos)
    from_context = vm.export_peft(both.select([1]), tmp_path / "a")
    from_features = vm.export_peft(videos[1:2], tmp_path / "b", dtype=torch.bfloat16)
    a = load_file(str(from_context / "adapter_model.safetensors"))
    b = load_file(str(from_features / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(t.dtype == torch.float32 for t in a.values()) and all(t.dtype == torch.bfloat16 for t in b.values())
    for key in a:
        torch.testing.assert_close(b[key].float(), a[key], atol=1e-2, rtol=1e-2)


def test_export_replaces_its_own_files_and_keeps_the_others(tmp_path, caplog):
    vm = _trained_vipe("llama")
    target = tmp_path / "project"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / "README.md").write_text("# My project\n")
    vm.export_peft(random_features(1, seed=1), target)
    first = load_file(str(target / "adapter_model.safetensors"))
    vm.export_peft(random_features(1, seed=2), target)
    second = load_file(str(target / "adapter_model.safetensors"))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert (target / "notes.txt").read_text() == "mine"
    assert (target / "README.md").read_text() == "# My project\n"  # a card the user wrote is never overwritten
    assert "not written by video2param" in caplog.text
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "adapter_config.json",
                                                        "adapter_model.safetensors", "notes.txt"]
    PeftModel.from_pretrained(make_tiny_lm("llama"), target)  # and PEFT reads it


def test_export_works_on_any_object_with_the_video_model_attributes(tmp_path):
    from types import SimpleNamespace

    vm = _trained_vipe("llama")
    twin = SimpleNamespace(config=vm.config, llm_info=vm.llm_info, method_kind=vm.method_kind,
                           fingerprint=vm.fingerprint, encode_video=vm.encode_video)
    a = load_file(str(export_peft(twin, random_features(1, seed=3), tmp_path / "a") / "adapter_model.safetensors"))
    b = load_file(str(vm.export_peft(random_features(1, seed=3), tmp_path / "b") / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------- errors


def test_token_method_cannot_be_exported(tmp_path):
    vm = wrap_model(make_tiny_lm("llama"), method="llava", vision_hidden_size=DV, num_frames=4)
    with pytest.raises(ValueError, match="'llava' puts the video into input tokens"):
        vm.export_peft(random_features(1), tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_token_context_is_refused(tmp_path):
    llava = wrap_model(make_tiny_lm("llama"), method="llava", vision_hidden_size=DV, num_frames=4)
    token_context = llava.encode_video(random_features(1))
    with pytest.raises(ValueError, match="got a TokenContext"):
        _trained_vipe("llama").export_peft(token_context, tmp_path / "lora")


def test_batch_of_two_videos_is_refused(tmp_path):
    vm = _trained_vipe("llama")
    with pytest.raises(ValueError, match="one video's deltas, got 2 videos"):
        vm.export_peft(random_features(2), tmp_path / "lora")
    with pytest.raises(ValueError, match="got 2 videos"):
        vm.export_peft(vm.encode_video(random_features(2)), tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_context_of_another_model_is_refused(tmp_path):
    gpt2_context = _trained_vipe("gpt2").encode_video(random_features(1))
    with pytest.raises(ValueError, match=r"deltas for transformer\.h\.0\..*not targets of this model"):
        _trained_vipe("llama").export_peft(gpt2_context, tmp_path / "lora")


def test_frame_mask_with_ready_context_is_refused(tmp_path):
    vm = _trained_vipe("llama")
    context = vm.encode_video(random_features(1))
    with pytest.raises(ValueError, match="frame_mask applies to raw videos"):
        vm.export_peft(context, tmp_path / "lora", frame_mask=torch.ones(1, 4, dtype=torch.bool))


def test_non_finite_delta_is_refused(tmp_path):
    vm = _trained_vipe("llama")
    with torch.no_grad():
        next(iter(vm.method.W_l.values()))[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"delta of model\.layers\.0\.self_attn\.q_proj contains NaN"):
        vm.export_peft(random_features(1), tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_module_loras_checks_sample_and_widths():
    from video2param import LowRank, WeightContext

    vm = _trained_vipe("llama")
    sites = vm.llm_info.sites
    context = vm.encode_video(random_features(1))
    with pytest.raises(ValueError, match="sample 1 out of range for a context of 1 video"):
        module_loras(context, sites, sample=1)
    q = sites[0]  # model.layers.0.self_attn.q_proj: 32 → 32
    with pytest.raises(ValueError, match=r"q_proj: A has input width 16, the module takes 32"):
        module_loras(WeightContext({q.key: LowRank(torch.ones(1, 4, 16), torch.ones(1, 32, 4), 1.0)}), sites)
    with pytest.raises(ValueError, match=r"q_proj: B has output width 8, the site has 32 output features"):
        module_loras(WeightContext({q.key: LowRank(torch.ones(1, 4, 32), torch.ones(1, 8, 4), 1.0)}), sites)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("order", ["wrap", "attach"])
def test_the_llms_own_lora_is_exported_with_the_video(tmp_path, arch, order):
    # Without the LLM's LoRA the PEFT model would answer differently from the video model: it is folded in.
    from video2param.llm_lora import attach_llm_lora

    targets = ["q_proj", "v_proj", "up_proj"] if arch == "llama" else ["c_attn", "c_fc"]
    lora = LoraConfig(r=2, lora_alpha=6, target_modules=targets, lora_dropout=0.0)
    llm = make_tiny_lm(arch)
    torch.manual_seed(0)
    vm = wrap_model(llm, **VIPE, llm_lora=lora if order == "wrap" else None)
    if order == "attach":
        attach_llm_lora(vm, lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in vm.method.W_l.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for name, p in vm.llm.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: make the LoRA matter
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    vm.eval()
    video = random_features(1)
    ids, mask = _prompts()
    with torch.no_grad():
        expected = vm(input_ids=ids, attention_mask=mask, videos=video).logits
    out = vm.export_peft(video, tmp_path / "lora")
    config = json.loads((out / "adapter_config.json").read_text())
    video_modules = {s.name for s in vm.llm_info.sites}
    assert set(config["target_modules"]) > video_modules  # the LoRA's modules outside the video's sites too
    peft_model = PeftModel.from_pretrained(make_tiny_lm(arch), out).eval()
    with torch.no_grad():
        got = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_an_llm_lora_one_plain_lora_cannot_carry_is_refused(tmp_path):
    vm = wrap_model(make_tiny_lm("llama"), **VIPE,
                    llm_lora=LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="use_dora.*merge_and_unload"):
        vm.export_peft(random_features(1), tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
