"""Adapter directory: save → load → same logits; tampered files give errors naming the problem."""

import json
import os

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


def _replace_weights(path, state):
    """Hand-edit the weights, and drop the config's record of the old file (as the digest error says to)."""
    save_file(state, str(path / "adapter_model.safetensors"))
    config = json.loads((path / "adapter_config.json").read_text())
    del config["weights_sha256"]
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_missing_and_unexpected_tensors(tmp_path, tokenizer):
    llm, path = _saved(tmp_path, tokenizer)
    state = load_file(str(path / "adapter_model.safetensors"))
    dropped = sorted(state)[0]
    del state[dropped]
    state["extra.weight"] = torch.zeros(2)
    _replace_weights(path, state)
    with pytest.raises(AdapterMismatchError, match=rf"missing tensors: {dropped}.*unexpected tensors: extra.weight"):
        VideoModel.from_pretrained(llm, path, tokenizer=tokenizer)


def test_wrong_shape(tmp_path, tokenizer):
    llm, path = _saved(tmp_path, tokenizer)
    state = load_file(str(path / "adapter_model.safetensors"))
    state["queries"] = torch.zeros(3, 32)
    _replace_weights(path, state)
    with pytest.raises(AdapterMismatchError, match=r"wrong shapes: queries: adapter \(3, 32\) vs model \(4, 32\)"):
        VideoModel.from_pretrained(llm, path, tokenizer=tokenizer)


def test_corrupt_weights_and_config(tmp_path, tokenizer):
    llm, path = _saved(tmp_path, tokenizer)
    (path / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not the file adapter_config.json was saved with"):
        VideoModel.from_pretrained(llm, path, tokenizer=tokenizer)
    _replace_weights(path, {})
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


# ---------------------------------------------------------------------------------------------- other files, crashes
VOCAB = 64  # fixed: len(tokenizer) grows when wrapping adds the <video> token, the base models must not


def _pair(tokenizer):
    """Two adapters for the same base model: `old` and a differently trained `new`, plus their logits."""
    old = _trained_like(_fresh(tokenizer))
    new = _trained_like(_fresh(tokenizer))
    return old, new


def _fresh(tokenizer, seed: int = 0):
    llm = make_tiny_lm("llama", vocab_size=VOCAB, seed=seed)
    return wrap_model(llm, method="vipe", vision_hidden_size=DV, num_frames=4, rank=4, inject_every=2, hidden_dim=32,
                      num_heads=4, depth=1, tokenizer=tokenizer).eval()


def _logits(vm, tokenizer):
    ids, mask = encode(tokenizer, ["<video> what colour ?"])
    with torch.no_grad():
        return vm(input_ids=ids, attention_mask=mask, videos=random_features(1)).logits


def _load_logits(path, tokenizer):
    vm = VideoModel.from_pretrained(make_tiny_lm("llama", vocab_size=VOCAB), path, tokenizer=tokenizer)
    return _logits(vm.eval(), tokenizer)


def _user_files(folder, readme: bool = True) -> dict[str, bytes]:
    """Files a user keeps in a project folder; returns what was written."""
    mine = {"src/main.py": b"print('hello')\n", "data.bin": b"\x00\x01", "notes.json": b"{}"}
    if readme:
        mine["README.md"] = b"# My project\n"
    for name, data in mine.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return mine


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_save_into_a_project_folder_keeps_every_other_file(tmp_path, tokenizer, monkeypatch, caplog):
    vm = _trained_like(_fresh(tokenizer))
    before = _user_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    vm.save_pretrained(".")
    after = _files(tmp_path)
    assert {k: after[k] for k in before} == before  # README.md included: a card the user wrote is kept
    assert set(after) - set(before) == {"adapter_config.json", "adapter_model.safetensors"}
    assert "not written by video2param" in caplog.text
    assert torch.equal(_load_logits(tmp_path, tokenizer), _logits(vm, tokenizer))
    # A card that video2param wrote is updated like the other adapter files.
    target = vm.save_pretrained(tmp_path / "adapter")
    (target / "README.md").write_text((target / "README.md").read_text().replace("video adapter", "OLD"))
    vm.save_pretrained(target)
    assert "OLD" not in (target / "README.md").read_text()


def test_saved_files_have_normal_permissions(tmp_path, tokenizer):
    (tmp_path / "probe").write_text("x")
    normal = (tmp_path / "probe").stat().st_mode & 0o7777
    out = _fresh(tokenizer).save_pretrained(tmp_path / "adapter")
    assert {p.name: p.stat().st_mode & 0o7777 for p in out.iterdir()} == {
        "README.md": normal, "adapter_config.json": normal, "adapter_model.safetensors": normal}


class _Killed(BaseException):
    """Stands for SIGKILL: raised inside os.replace while os.unlink does nothing, so no cleanup happens."""


def _count_replaces(monkeypatch, action) -> int:
    calls = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda *a, **k: (calls.append(a), real(*a, **k))[1])
    action()
    monkeypatch.setattr(os, "replace", real)
    return len(calls)


def test_a_save_killed_at_any_step_leaves_a_loadable_adapter(tmp_path, tokenizer, monkeypatch):
    old, new = _pair(tokenizer)
    old_logits, new_logits = _logits(old, tokenizer), _logits(new, tokenizer)
    assert not torch.equal(old_logits, new_logits)
    steps = _count_replaces(monkeypatch, lambda: new.save_pretrained(tmp_path / "count"))
    assert steps >= 4  # journal, weights, config, card
    real_replace, real_unlink = os.replace, os.unlink
    outcomes = []
    for kill_at in [*range(steps), None]:  # None: killed after the last rename, before the journal is removed
        folder = tmp_path / f"kill-{kill_at}"
        old.save_pretrained(folder)
        mine = _user_files(folder, readme=False)  # (a README of the user's own would skip the card's step)
        calls = []

        def replace(src, dst):
            calls.append(dst)
            if len(calls) - 1 == kill_at:
                raise _Killed
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "unlink", lambda path, *a, **k: None)
        try:
            new.save_pretrained(folder)
        except _Killed:
            pass
        finally:
            monkeypatch.setattr(os, "replace", real_replace)
            monkeypatch.setattr(os, "unlink", real_unlink)
        loaded = _load_logits(folder, tokenizer)
        assert torch.equal(loaded, old_logits) or torch.equal(loaded, new_logits), kill_at
        outcomes.append("new" if torch.equal(loaded, new_logits) else "old")
        assert {k: _files(folder)[k] for k in mine} == mine
        # The next save cleans up after the killed one and wins.
        new.save_pretrained(folder)
        leftovers = [p.name for p in folder.iterdir() if ".v2p-" in p.name]
        assert leftovers == [], (kill_at, leftovers)
        assert torch.equal(_load_logits(folder, tokenizer), new_logits)
    assert outcomes[0] == "old" and outcomes[-1] == "new" and "new" in outcomes[1:-1]


def test_a_process_killed_between_weights_and_config_leaves_the_new_adapter(tmp_path, tokenizer):
    import subprocess
    import sys
    from pathlib import Path

    folder = tmp_path / "adapter"
    old = _trained_like(_fresh(tokenizer))
    old.save_pretrained(folder)
    # The child builds the same kind of adapter (no tokenizer needed) and dies like SIGKILL once the new weights are
    # in place, before the config is replaced.
    child = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import torch
from safetensors.torch import save_file
from tiny_models import make_tiny_lm
from video2param import wrap_model

vm = wrap_model(make_tiny_lm("llama", vocab_size={VOCAB}), method="vipe", vision_hidden_size={DV}, num_frames=4,
                rank=4, inject_every=2, hidden_dim=32, num_heads=4, depth=1)
with torch.no_grad():
    for p in vm.method.parameters():
        p.add_(torch.randn_like(p) * 0.05)
save_file({{k: v.contiguous() for k, v in vm.adapter_state_dict().items()}}, {str(tmp_path / "expected.safetensors")!r})
real = os.replace
def replace(src, dst):
    if str(dst).endswith("adapter_config.json"):
        os._exit(9)  # no cleanup, no finally blocks
    real(src, dst)
os.replace = replace
vm.save_pretrained({str(folder)!r})
"""
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=900)
    assert result.returncode == 9, result.stderr
    assert (folder / ".adapter_config.json.v2p-next").exists()  # the journal of the interrupted save
    expected = load_file(str(tmp_path / "expected.safetensors"))
    vm = VideoModel.from_pretrained(make_tiny_lm("llama", vocab_size=VOCAB), folder, tokenizer=tokenizer)
    state = vm.adapter_state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)


def test_full_disk_is_an_oserror_naming_the_file_and_keeps_the_old_adapter(tmp_path, tokenizer, monkeypatch):
    import errno

    import video2param.serialization as serialization
    from safetensors import SafetensorError

    old, new = _pair(tokenizer)
    folder = old.save_pretrained(tmp_path / "adapter")
    before = _files(folder)

    def full_disk(tensors, filename, metadata=None):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(serialization, "save_file", full_disk)
    with pytest.raises(OSError) as info:
        new.save_pretrained(folder)
    assert info.value.errno == errno.ENOSPC and "adapter_model.safetensors" in str(info.value)
    assert _files(folder) == before


def test_metrics_must_be_numbers(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"metrics\['acc'\]: expected a finite number, got 'high'"):
        _fresh(tokenizer).save_pretrained(tmp_path / "adapter", metrics={"acc": "high"})
    assert not (tmp_path / "adapter").exists()


# ---------------------------------------------------------------------------------------------- what loading checks
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, tokenizer, bad):
    llm, path = _saved(tmp_path, tokenizer)
    state = load_file(str(path / "adapter_model.safetensors"))
    state["queries"][0, 0] = bad
    _replace_weights(path, state)
    with pytest.raises(ValueError, match=r"tensor\(s\) queries contain NaN or inf"):
        VideoModel.from_pretrained(llm, path, tokenizer=tokenizer)
    assert not any(type(m).__name__ == "LowRankWrapper" for m in llm.modules())


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_or_bool_weights_are_refused_not_cast(tmp_path, tokenizer, dtype):
    llm, path = _saved(tmp_path, tokenizer)
    state = load_file(str(path / "adapter_model.safetensors"))
    state["queries"] = torch.ones_like(state["queries"], dtype=dtype)
    _replace_weights(path, state)
    name = str(dtype).replace("torch.", "")
    with pytest.raises(AdapterMismatchError, match=rf"wrong dtypes .*queries: adapter {name} vs model float32"):
        VideoModel.from_pretrained(llm, path, tokenizer=tokenizer)
    assert not any(type(m).__name__ == "LowRankWrapper" for m in llm.modules())


def test_half_precision_weights_load(tmp_path, tokenizer):
    llm, path = _saved(tmp_path, tokenizer)
    state = load_file(str(path / "adapter_model.safetensors"))
    _replace_weights(path, {k: v.half() for k, v in state.items()})
    VideoModel.from_pretrained(llm, path, tokenizer=tokenizer)


def test_another_base_with_the_same_shapes_is_refused_unless_allowed(tmp_path, tokenizer):
    vm = _trained_like(_fresh(tokenizer, seed=0))
    vm.save_pretrained(tmp_path / "adapter")
    other = make_tiny_lm("llama", vocab_size=VOCAB, seed=1)  # same config, other weights
    with pytest.raises(AdapterMismatchError, match="same shapes: sampled weights differ.*allow_base_mismatch=True"):
        VideoModel.from_pretrained(other, tmp_path / "adapter", tokenizer=tokenizer)
    assert not any(type(m).__name__ == "LowRankWrapper" for m in other.modules())
    with pytest.warns(UserWarning, match="loading anyway because allow_base_mismatch=True"):
        VideoModel.from_pretrained(other, tmp_path / "adapter", tokenizer=tokenizer, allow_base_mismatch=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_same_base_in_another_dtype_matches(tokenizer, dtype):
    from video2param.serialization import BaseModelFingerprint

    base = make_tiny_lm("llama", vocab_size=VOCAB)
    saved = BaseModelFingerprint.of(base)
    assert saved.weights_sample is not None and len(saved.weights_sample) > 16
    assert saved.weights_match(BaseModelFingerprint.of(base.to(dtype))) is True
    other = BaseModelFingerprint.of(make_tiny_lm("llama", vocab_size=VOCAB, seed=1).to(dtype))
    assert saved.weights_match(other) is False


def test_adapter_saved_without_digests_loads_without_warnings(tmp_path, tokenizer):
    import warnings

    vm = _trained_like(_fresh(tokenizer))
    path = vm.save_pretrained(tmp_path / "adapter")
    config = json.loads((path / "adapter_config.json").read_text())
    del config["weights_sha256"], config["base_model"]["weights_sample"]  # as written by video2param 0.1.0
    (path / "adapter_config.json").write_text(json.dumps(config))
    other = make_tiny_lm("llama", vocab_size=VOCAB, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VideoModel.from_pretrained(other, path, tokenizer=tokenizer)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["base_model"].update(hidden_size="32"), r"base_model.hidden_size: expected an int, got '32'"),
        (lambda c: c["base_model"].pop("vocab_size"), "base_model: missing key"),
        (lambda c: c["base_model"].update(weights_sample=["x"]), r"base_model.weights_sample\[0\]: expected a finite"),
        (lambda c: c["adapter"].update(rank=1e6), "rank: expected an int"),
        (lambda c: c.update(format_version=True), "format_version True is not supported"),
    ],
)
def test_malformed_config_entries_are_named(tmp_path, tokenizer, edit, message):
    llm, path = _saved(tmp_path, tokenizer)
    config = json.loads((path / "adapter_config.json").read_text())
    edit(config)
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        VideoModel.from_pretrained(llm, path, tokenizer=tokenizer)
