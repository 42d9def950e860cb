"""The scripts under benchmarks/ start: `python benchmarks/X.py` puts benchmarks/ first on sys.path, so a script
named like a package that transformers probes for (a `kernels.py` once shadowed HF's optional `kernels` package and
broke every script there) must not exist; each script's --help must run."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py"))


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=BENCHMARKS.parent, capture_output=True, text=True, timeout=300)


def test_no_script_shadows_what_the_libraries_import():
    # What a benchmark does first: import the library and build an HF model, with benchmarks/ at sys.path[0].
    probe = ("import sys; sys.path.insert(0, 'benchmarks'); import video2param; "
             "from transformers import LlamaConfig, LlamaForCausalLM; "
             "LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, "
             "num_attention_heads=2, vocab_size=32))")
    result = _run(["-c", probe])
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help_runs(script):
    result = _run([f"benchmarks/{script}", "--help"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower()


def test_appearance_gap_reads_when_the_second_object_arrives():
    # ppllava_movingshapes.py --order-by-gap groups order questions by it: presence is the front end's channel 0.
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("ppllava_movingshapes", BENCHMARKS / "ppllava_movingshapes.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    video = torch.zeros(10, 4, 25)
    video[1:4, 0, :4] = torch.tensor([1.0, 0.9, 0.1, 0.1])  # a red object on frames 1-3
    video[4:6, 1, :4] = torch.tensor([1.0, 0.9, 0.1, 0.1])  # the same object in the next cell
    assert script.appearance_gap(video) == -1
    video[7:10, 2, :4] = torch.tensor([1.0, 0.1, 0.1, 0.9])  # a blue one from frame 7, after red has gone
    assert script.appearance_gap(video) == 6
    assert [name for top, name in script.GAP_BUCKETS if 6 <= top][0] == "5-8"


def test_ppllava_script_pools_as_the_demo_unless_told_otherwise():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ppllava_movingshapes", BENCHMARKS / "ppllava_movingshapes.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.pooling_layout(None, 8) == {"output_size": [3, 1, 1]}
    assert script.pooling_layout(None, 32) == {"output_size": [2, 2, 2], "extra_output_sizes": [[6, 1, 1]]}
    assert script.pooling_layout([3, 2, 2], 32) == {"output_size": [3, 2, 2]}  # a size given is the whole layout

