"""`video2param train` end to end on a tiny LM and vision tower saved to disk and MP4 files written here: it trains,
evaluates, checkpoints, resumes when run again, writes an adapter that loads and that `video2param ask` answers with."""

import json

import pytest
from hub_server import LoopbackHub, hub_server  # noqa: F401 - `hub_server` is a pytest fixture
from test_video_encoder import tiny_clip
from tiny_models import make_tiny_lm
from video_files import write_mp4

from video2param.cli import main
from video2param.data import PROMPT_WORDS
from video2param.data.tokenizer import build_word_tokenizer
from video2param.llm_lora import LORA_SUBDIR

WORDS = ["what", "is", "the", "man", "holding", "a", "red", "blue", "umbrella", "car", "colour", "of", "?", "."]
QA = [("What is the man holding?", "A red umbrella."), ("What colour is the car?", "Blue.")]
TINY_VIPE = ["--option", "rank=4", "--option", "hidden_dim=32", "--option", "num_heads=4", "--option", "depth=1",
             "--option", "inject_every=2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cli")
    tok = build_word_tokenizer(WORDS + list(PROMPT_WORDS))
    llm = make_tiny_lm("llama", vocab_size=len(tok))  # no row for <video> yet: the command adds it
    llm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    tiny_clip().save_pretrained(root / "vision")
    (root / "clips").mkdir()
    clips = [write_mp4(root / "clips" / f"c{i}.mp4", num_frames=8, first_index=20 * i) for i in range(3)]
    rows = [{"video": f"clips/c{i}.mp4", "conversations": [{"from": "human", "value": f"<video>\n{q}"},
                                                          {"from": "gpt", "value": a}]}
            for i in range(3) for q, a in QA]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:4]) + "\n")
    (root / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows[4:]) + "\n")
    return root, clips


def _train(root, output, *extra):
    return main(["train", str(root / "train.jsonl"), "--llm", str(root / "llm"), "--vision", str(root / "vision"),
                 "--method", "vipe", "--output", str(output), "--frames", "4", "--batch-size", "2", "--lr", "1e-3",
                 "--save-steps", "2", "--logging-steps", "1", "--no-progress", *TINY_VIPE, *extra])


def test_train_evaluates_checkpoints_resumes_and_ask_answers(setup, tmp_path, capsys):
    root, clips = setup
    out = tmp_path / "run"
    assert _train(root, out, "--steps", "4", "--eval-data", str(root / "eval.jsonl"), "--eval-steps", "2") == 0
    printed = capsys.readouterr().out
    assert "eval_loss" in printed and "'loss'" in printed
    assert (out / "checkpoint-2" / "adapter").is_dir() and (out / "checkpoint-4" / "adapter").is_dir()
    assert any((out / "feature_cache").rglob("*.safetensors"))  # each video encoded once, then read back
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["adapter"]["method"] == "vipe" and "eval_loss" in config["metrics"]
    assert (out / "llm" / "model.safetensors").is_file()  # the embedding grew by the <video> row: LLM saved too

    # The same command with more steps continues from the last checkpoint.
    assert _train(root, out, "--steps", "6") == 0
    printed = capsys.readouterr().out
    assert f"resuming from {out / 'checkpoint-4'}" in printed
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and [e["step"] for e in state["log_history"] if "loss" in e][-2:] == [5, 6]

    assert main(["ask", clips[0], "What is the man holding?", "--adapter", str(out / "adapter"), "--llm",
                 str(out / "llm"), "--vision", str(root / "vision"), "--max-new-tokens", "3"]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer and all(word in WORDS + list(PROMPT_WORDS) + ["<unk>"] for word in answer.split())


def test_train_with_a_lora_on_the_llm_and_push_to_the_hub(setup, tmp_path, capsys, hub_server: LoopbackHub):
    root, _ = setup
    out = tmp_path / "lora"
    assert _train(root, out, "--steps", "2", "--stage", "sft", "--lora-rank", "2", "--lora-targets",
                  "q_proj,v_proj", "--push-to-hub", "me/cli-adapter") == 0
    assert "LLM LoRA params:" in capsys.readouterr().out
    assert (out / "adapter" / LORA_SUBDIR / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint-2" / "adapter" / LORA_SUBDIR / "adapter_config.json").is_file()
    pushed = hub_server.files("me/cli-adapter")
    expected = {"adapter_config.json", "adapter_model.safetensors", f"{LORA_SUBDIR}/adapter_model.safetensors"}
    assert expected <= set(pushed)


@pytest.mark.parametrize("extra,message", [
    (["--lora-rank", "2"], "add --stage sft"),
    (["--steps", "0"], "--steps: expected a positive integer"),
    (["--option", "rank"], "expected KEY=VALUE"),
    (["--eval-data", "nowhere.jsonl"], "--eval-data: no file"),
    (["--deepspeed", "nowhere.json"], "--deepspeed: no file"),
])
def test_bad_arguments_print_one_line(setup, tmp_path, capsys, extra, message):
    root, _ = setup
    assert _train(root, tmp_path / "bad", *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("video2param train:") and message in err
    assert main(["train", str(tmp_path / "none.jsonl"), "--llm", "x", "--vision", "y", "--method", "vipe",
                 "--output", str(tmp_path)]) == 2
    assert "DATA: no file" in capsys.readouterr().err
