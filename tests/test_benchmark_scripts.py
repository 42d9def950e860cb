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
