"""The command line: `video2param demo` end to end (tiny settings) and `video2param ask` on a real video file."""

import json
import shlex
from pathlib import Path

import pytest
import torch
from video_files import write_mp4

from video2param import wrap_model
from video2param.cli import main


def test_demo_prints_its_table_and_an_ask_command_that_runs(tmp_path, capsys):
    """The demo at a tiny budget: the table (chance row first), everything `ask` needs on disk, and the printed
    `video2param ask` command on the demo's own MP4 runs and gives the answer the demo reported."""
    out = tmp_path / "demo"
    code = main(["demo", "--steps", "3", "--train-size", "30", "--test-size", "10", "--batch-size", "8",
                 "--output-dir", str(out), "--threads", "1", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| method | color | shape | direction | order | count | static | temporal | overall |" in printed
    assert "| chance | 25.0 | 25.0 | 25.0 | 25.0 | 50.0 | 25.0 | 33.3 | 30.0 |" in printed
    assert "| llava (baseline) |" in printed and "| vipe |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["chance"]["count"] == 0.5
    assert results["rows"]["llava"]["flops_ratio"] == 1.0
    assert results["rows"]["vipe"]["visual_tokens"] == 0 < results["rows"]["llava"]["visual_tokens"]
    assert results["rows"]["vipe"]["flops_ratio"] < 1.0
    for method in ("llava", "vipe"):
        assert (out / method / "adapter" / "adapter_model.safetensors").is_file()
        assert (out / method / "llm" / "model.safetensors").is_file()
        assert (out / method / "llm" / "tokenizer.json").is_file()
    assert (out / "vision" / "front_end.json").is_file() and (out / "vision" / "feature_stats.json").is_file()

    example = results["ask"]
    args = shlex.split(example["command"])
    assert args[:2] == ["video2param", "ask"] and args[2].endswith(".mp4") and Path(args[2]).is_file()
    assert args[2:] and example["command"] in printed
    assert main(args[1:]) == 0
    assert capsys.readouterr().out.strip() == example["answer"]


def test_demo_all_puts_every_registered_method_in_one_table(tmp_path, capsys):
    """`--method all`: each method beside the baseline (PPLLaVA with the demo's aligned text tower, Video2LoRA
    taught by the trained llava), none failing; the `ask` example uses a method that its saved files can answer."""
    from video2param.methods.base import available_methods, get_method

    out = tmp_path / "demo"
    code = main(["demo", "--method", "all", "--steps", "2", "--train-size", "24", "--test-size", "10",
                 "--batch-size", "8", "--output-dir", str(out), "--threads", "1", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["failed"] == {}
    assert set(results["rows"]) == set(available_methods())
    for method in available_methods():
        label = f"{method} (baseline)" if method == "llava" else method
        assert f"| {label} |" in printed
    assert results["rows"]["ppllava"]["visual_tokens"] < results["rows"]["llava"]["visual_tokens"]
    assert results["rows"]["video2lora"]["stage"] == "pretrain" and results["rows"]["video2lora"]["teacher"]
    # The student gets its step_factor times the budget; the others the budget.
    assert results["rows"]["video2lora"]["steps"] == 4 * 2 and results["rows"]["llava"]["steps"] == 2
    assert results["rows"]["ppllava"]["steps"] == 2 * 2
    assert not {"text_encoder", "teacher"} & set(get_method(results["ask"]["method"]).needs)


def test_demo_text_tower_methods_need_the_demo_front_end(tmp_path):
    # A vision tower named by --vision comes without the dual encoder PPLLaVA reads the question with: a clear
    # error (with --method all, that method's row is reported as failed, the others run).
    from video2param.demo import DemoConfig, _aligned_text_tower, demo_data_config

    with pytest.raises(ValueError, match="needs the dual encoder"):
        _aligned_text_tower(DemoConfig(vision="openai/clip-vit-base-patch32"), demo_data_config(), ([], []), ([], []),
                            tmp_path, print)


def test_demo_methods_start_from_the_same_lm():
    # wrap_model adds the video token to the tokenizer it gets: the LM factory must not see a larger vocabulary for
    # the methods trained after the first (that changed their random initialisation).
    from video2param.demo import DemoConfig, _language_model, demo_data_config

    tokenizer, make_llm = _language_model(DemoConfig(), demo_data_config())
    first = make_llm()
    wrap_model(first, method="llava", tokenizer=tokenizer, vision_hidden_size=8, num_frames=2)
    second = make_llm()
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_demo_settings_follow_the_video_length():
    # Measured per length: llava's 2e-3 fails the static questions at 32 frames, and PPLLaVA keeps the 2 x 2 grid
    # there (docs/results.md); everything not named for the longer length stays as it is.
    from video2param.demo import MethodSettings, method_options, method_settings

    assert (method_settings("llava").lr, method_settings("llava", 31).lr, method_settings("llava", 32).lr) == \
        (2e-3, 2e-3, 1e-3)
    assert method_options("ppllava", 8) == {"num_frames": 8, "options": {"output_size": [3, 1, 1]}}
    assert method_options("ppllava", 64) == {"num_frames": 64, "options": {"output_size": [2, 2, 2],
                                                                          "extra_output_sizes": [[6, 1, 1]]}}
    assert method_settings("ppllava", 32).lr == method_settings("ppllava", 8).lr
    assert (method_settings("ppllava", 8).steps(1200), method_settings("ppllava", 32).steps(1200)) == (2400, 2400)
    assert "scorer_reads_question" not in method_options("linvt", 8)["options"]
    assert method_options("linvt", 32)["options"]["scorer_reads_question"] is True
    assert (method_settings("linvt", 8).steps(1200), method_settings("linvt", 32).steps(1200)) == (1200, 2400)
    steps = MethodSettings(lr=1.0, adapter={"rank": 4, "options": {"a": 1, "b": 1}},
                           from_frames={16: {"adapter": {"options": {"b": 2}}}, 8: {"lr": 0.5}})
    assert (steps.at(4).lr, steps.at(8).lr, steps.at(16).lr) == (1.0, 0.5, 0.5)
    assert steps.at(15).adapter == {"rank": 4, "options": {"a": 1, "b": 1}}
    assert steps.at(16).adapter == {"rank": 4, "options": {"a": 1, "b": 2}}
    assert steps.adapter == {"rank": 4, "options": {"a": 1, "b": 1}}  # the entry itself is left alone


def test_demo_step_factor_multiplies_the_budget_and_rejects_non_positive_ints():
    from video2param.demo import MethodSettings, method_settings

    assert MethodSettings(lr=1.0, step_factor=3).at(32).steps(100) == 300
    by_length = MethodSettings(lr=1.0, step_factor=4, from_frames={32: {"step_factor": 2}})
    assert (by_length.at(8).steps(100), by_length.at(32).steps(100)) == (400, 200)
    with pytest.raises(ValueError, match=r"from_frames\[32\]: unknown setting"):
        MethodSettings(lr=1.0, from_frames={32: {"steps": 2}})
    assert method_settings("llava").steps(100) == 100
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="step_factor"):
            MethodSettings(lr=1.0, step_factor=bad)


def test_demo_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "many"])
    assert "invalid int value" in capsys.readouterr().err
    assert main(["demo", "--method", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["demo", "--steps", "0"]) == 2
    assert "steps: expected a positive integer" in capsys.readouterr().err


def test_ask_answers_from_a_video_file(tmp_path, capsys):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from video2param.data import MovingShapesConfig, moving_shapes_tokenizer
    from video2param.demo import build_small_llm

    tok = moving_shapes_tokenizer(MovingShapesConfig())
    llm = build_small_llm(len(tok) + 1, seed=0)
    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4))
    tower.save_pretrained(tmp_path / "tower")
    vm = wrap_model(llm, method="vipe", vision=tower, tokenizer=tok, num_frames=4, rank=4, hidden_dim=32,
                    num_heads=4, depth=1)
    vm.save_pretrained(tmp_path / "adapter")
    vm.save_base_model(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    video = write_mp4(tmp_path / "clip.mp4", num_frames=12, width=32, height=32)
    code = main(["ask", str(video), "what colour is the square?", "--adapter", str(tmp_path / "adapter"),
                 "--llm", str(tmp_path / "lm"), "--vision", str(tmp_path / "tower"), "--max-new-tokens", "2"])
    assert code == 0
    answer = capsys.readouterr().out.strip()
    assert answer and all(word in tok.get_vocab() for word in answer.split())


def test_ask_reports_a_missing_video(tmp_path, capsys):
    code = main(["ask", str(tmp_path / "nope.mp4"), "what?", "--adapter", str(tmp_path), "--llm", str(tmp_path),
                 "--vision", str(tmp_path)])
    assert code == 2
    assert "video2param ask:" in capsys.readouterr().err
