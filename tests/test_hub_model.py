"""VideoModel ↔ Hub round trip against the loopback Hub: push, pull into an empty cache, pinning, errors, atomicity."""

from __future__ import annotations

import pytest
import torch
from conftest import DV, encode, random_features
from huggingface_hub import HfApi
from tiny_models import make_tiny_lm

from hub_server import LoopbackHub, hub_server  # noqa: F401 - `hub_server` is a pytest fixture
from video2param import AdapterMismatchError, VideoModel, wrap_model
from video2param.hub import AdapterNotFoundError
from video2param.inject.lowrank import LowRankWrapper

REPO = "test-user/video-adapter"
VOCAB = 64  # fixed: len(tokenizer) grows when wrapping adds the <video> token, the base models must not
OPTIONS = {
    "llava": {},
    "vipe": {"hidden_dim": 32, "num_heads": 4, "depth": 1, "rank": 4, "inject_every": 2},
}


def _llm(tokenizer, arch: str = "llama"):
    assert len(tokenizer) < VOCAB
    return make_tiny_lm(arch, vocab_size=VOCAB)


def _model(tokenizer, method: str = "vipe", seed: int = 0) -> VideoModel:
    """A wrapped model whose adapter tensors all hold non-trivial values, as if trained (vipe's W_l starts at 0)."""
    vm = wrap_model(_llm(tokenizer), method=method, vision_hidden_size=DV, num_frames=4, tokenizer=tokenizer,
                    **OPTIONS[method])
    _perturb(vm, seed)
    return vm.eval()


def _perturb(vm: VideoModel, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vm.method.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _logits(vm: VideoModel, tokenizer) -> torch.Tensor:
    ids, mask = encode(tokenizer, ["<video> what colour is the object ?", "which way does it move ?"])
    with torch.no_grad():
        return vm(input_ids=ids, attention_mask=mask, videos=random_features(2)).logits


@pytest.mark.parametrize("method", ["llava", "vipe"])
def test_push_then_pull_into_empty_cache_gives_identical_logits(hub_server: LoopbackHub, tmp_path, tokenizer,
                                                                method):
    vm = _model(tokenizer, method)
    expected = _logits(vm, tokenizer)
    commit = vm.push_to_hub(REPO, commit_message="first upload", metrics={"accuracy": 0.75},
                            endpoint=hub_server.endpoint)
    assert commit.oid == hub_server.head(REPO)
    assert set(hub_server.files(REPO)) == {".gitattributes", "README.md", "adapter_config.json",
                                           "adapter_model.safetensors"}
    card = hub_server.files(REPO)["README.md"].decode()
    assert f"# {method} video adapter" in card and "| accuracy | 0.75 |" in card and "llama" in card

    cache = tmp_path / "empty_cache"
    pulled = VideoModel.from_pretrained(_llm(tokenizer), REPO, tokenizer=tokenizer, cache_dir=cache,
                                        endpoint=hub_server.endpoint).eval()
    assert any(cache.rglob("adapter_model.safetensors"))  # really fetched into the new cache
    assert torch.equal(_logits(pulled, tokenizer), expected)


def test_pinned_revision_gives_the_first_version(hub_server: LoopbackHub, tmp_path, tokenizer):
    vm = _model(tokenizer)
    first_logits = _logits(vm, tokenizer)
    first = vm.push_to_hub(REPO)  # endpoint and token from the environment (HF_ENDPOINT, HF_TOKEN)
    _perturb(vm, seed=1)
    second_logits = _logits(vm, tokenizer)
    second = vm.push_to_hub(REPO, commit_message="retrained")
    assert first.oid != second.oid and not torch.equal(first_logits, second_logits)
    assert hub_server.history(REPO)[:2] == [second.oid, first.oid]

    cache = tmp_path / "cache"
    latest = VideoModel.from_pretrained(_llm(tokenizer), REPO, tokenizer=tokenizer, cache_dir=cache).eval()
    pinned = VideoModel.from_pretrained(_llm(tokenizer), REPO, tokenizer=tokenizer, cache_dir=cache,
                                        revision=first.oid).eval()
    assert torch.equal(_logits(latest, tokenizer), second_logits)
    assert torch.equal(_logits(pinned, tokenizer), first_logits)


def test_private_repo_needs_the_token(hub_server: LoopbackHub, tmp_path, tokenizer):
    _model(tokenizer).push_to_hub(REPO, private=True, endpoint=hub_server.endpoint)
    assert hub_server.is_private(REPO)
    with pytest.raises(AdapterNotFoundError, match="not found, or private"):
        VideoModel.from_pretrained(_llm(tokenizer), REPO, token=False, cache_dir=tmp_path / "c1",
                                   endpoint=hub_server.endpoint)
    VideoModel.from_pretrained(_llm(tokenizer), REPO, token=hub_server.token, cache_dir=tmp_path / "c2",
                               endpoint=hub_server.endpoint)


def test_missing_repo_and_revision(hub_server: LoopbackHub, tmp_path, tokenizer):
    llm = _llm(tokenizer)
    with pytest.raises(AdapterNotFoundError, match="Hub repo 'test-user/no-such-adapter'.* not found") as info:
        VideoModel.from_pretrained(llm, "test-user/no-such-adapter", cache_dir=tmp_path, endpoint=hub_server.endpoint)
    assert info.value.location == "test-user/no-such-adapter"
    _model(tokenizer).push_to_hub(REPO, endpoint=hub_server.endpoint)
    with pytest.raises(AdapterNotFoundError, match="Revision 'v9' not found"):
        VideoModel.from_pretrained(llm, REPO, revision="v9", cache_dir=tmp_path, endpoint=hub_server.endpoint)
    assert not any(isinstance(m, LowRankWrapper) for m in llm.modules())  # failed loads never wrap the LLM


def test_repo_without_weights_is_a_clear_error(hub_server: LoopbackHub, tmp_path, tokenizer):
    folder = _model(tokenizer).save_pretrained(tmp_path / "adapter")
    (folder / "adapter_model.safetensors").unlink()
    HfApi(endpoint=hub_server.endpoint).create_repo(REPO)
    HfApi(endpoint=hub_server.endpoint).upload_folder(repo_id=REPO, folder_path=folder)
    with pytest.raises(AdapterNotFoundError, match=r"missing required file\(s\) \['adapter_model.safetensors'\]") as info:
        VideoModel.from_pretrained(_llm(tokenizer), REPO, cache_dir=tmp_path / "cache", endpoint=hub_server.endpoint)
    assert info.value.missing == ("adapter_model.safetensors",)


def test_pickles_and_code_in_the_repo_are_ignored(hub_server: LoopbackHub, tmp_path, tokenizer):
    vm = _model(tokenizer)
    expected = _logits(vm, tokenizer)
    folder = vm.save_pretrained(tmp_path / "adapter")
    (folder / "modeling_evil.py").write_text("raise SystemExit('executed remote code')\n")
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not a real pickle")
    HfApi(endpoint=hub_server.endpoint).create_repo(REPO)
    HfApi(endpoint=hub_server.endpoint).upload_folder(repo_id=REPO, folder_path=folder)
    assert {"modeling_evil.py", "adapter_model.bin"} <= set(hub_server.files(REPO))

    cache = tmp_path / "cache"
    pulled = VideoModel.from_pretrained(_llm(tokenizer), REPO, tokenizer=tokenizer, cache_dir=cache,
                                        endpoint=hub_server.endpoint).eval()
    assert torch.equal(_logits(pulled, tokenizer), expected)
    downloaded = {p.name for p in cache.rglob("*") if p.is_file() and "snapshots" in p.parts}
    assert downloaded == {"README.md", "adapter_config.json", "adapter_model.safetensors"}


def test_adapter_for_another_base_model_is_refused(hub_server: LoopbackHub, tmp_path, tokenizer):
    _model(tokenizer).push_to_hub(REPO, endpoint=hub_server.endpoint)
    gpt2 = _llm(tokenizer, "gpt2")
    with pytest.raises(AdapterMismatchError, match="model_type: adapter has 'llama', model has 'gpt2'"):
        VideoModel.from_pretrained(gpt2, REPO, tokenizer=tokenizer, cache_dir=tmp_path, endpoint=hub_server.endpoint)
    assert not any(isinstance(m, LowRankWrapper) for m in gpt2.modules())  # the refused model is left as it was


def test_interrupted_save_keeps_the_previous_adapter(tmp_path, tokenizer, monkeypatch):
    import video2param.serialization as serialization

    vm = _model(tokenizer)
    old_logits = _logits(vm, tokenizer)
    target = vm.save_pretrained(tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    _perturb(vm, seed=7)

    def crash_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # a truncated weights file, as a crash during the write leaves it
            f.write(b"\x10\x00\x00\x00")
        raise KeyboardInterrupt("power cut during save")

    monkeypatch.setattr(serialization, "save_file", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        vm.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no half-written sibling left behind
    monkeypatch.undo()
    reloaded = VideoModel.from_pretrained(_llm(tokenizer), target, tokenizer=tokenizer).eval()
    assert torch.equal(_logits(reloaded, tokenizer), old_logits)


def _code_block(card: str) -> str:
    return card.split("```python\n", 1)[1].split("```", 1)[0]


def _card(vm, **kwargs) -> str:
    from video2param.model_card import render_model_card

    return render_model_card(vm.config, vm.fingerprint, method_kind=vm.method_kind,
                             num_parameters=sum(p.numel() for p in vm.method.parameters()), **kwargs)


def test_model_card_loading_code_is_valid_python(tmp_path, tokenizer):
    features_only = _model(tokenizer)
    card = _card(features_only)
    assert "not recorded (features were given directly)" in card
    compile(_code_block(card), "card", "exec")

    llm = _llm(tokenizer)
    llm.config._name_or_path = "test-org/tiny-llama"
    named = wrap_model(llm, method="vipe", vision_hidden_size=DV, num_frames=4, tokenizer=tokenizer,
                       **OPTIONS["vipe"])
    code = _code_block(_card(named, vision_name="test-org/tiny-clip", metrics={"accuracy": 0.5}))
    compile(code, "card", "exec")
    assert 'AutoModelForCausalLM.from_pretrained("test-org/tiny-llama")' in code
    assert 'vision = VisionEncoder.from_pretrained("test-org/tiny-clip")' in code and "vision=vision" in code
    llm.config._name_or_path = 'quote"and\\backslash'  # any name still gives valid code
    compile(_code_block(_card(named)), "card", "exec")


def test_saved_card_names_the_vision_tower(tmp_path, tokenizer):
    from types import SimpleNamespace

    vm = _model(tokenizer)
    vm.vision = SimpleNamespace(name="test-org/tiny-clip")  # what a VisionEncoder loaded by name reports
    card = (vm.save_pretrained(tmp_path / "adapter") / "README.md").read_text()
    assert 'VisionEncoder.from_pretrained("test-org/tiny-clip")' in card


def _imported_modules(module) -> set[str]:
    """Every module a source file imports, anywhere in it (TYPE_CHECKING blocks and function bodies included)."""
    import ast
    import inspect

    package = module.__name__.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.ImportFrom):
            base = package if node.level else ""
            name = ".".join(p for p in (base, node.module or "") if p)
            found |= {name} | {f"{name}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def test_model_card_and_export_never_import_the_model_module():
    import video2param.export
    import video2param.model_card

    for module in (video2param.model_card, video2param.export):
        assert "video2param.model" not in _imported_modules(module), module.__name__


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fingerprint_of_an_unwrapped_llm_matches_the_wrapped_one(tokenizer, arch):
    from video2param.serialization import BaseModelFingerprint

    llm = _llm(tokenizer, arch)
    llm.config._name_or_path = f"test-org/tiny-{arch}"
    before = BaseModelFingerprint.of(llm)
    assert before == wrap_model(llm, method="llava", vision_hidden_size=DV).fingerprint
    assert before.name == f"test-org/tiny-{arch}" and before.model_type == arch and before.vocab_size == VOCAB
