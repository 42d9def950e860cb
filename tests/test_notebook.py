"""The example notebook runs headless, end to end, with tiny settings (and its structure stays papermill-ready).

The notebook reads its parameters from environment variables (``V2P_NB_*``); the test sets tiny values, runs
every cell in a fresh kernel on this interpreter, and checks that the reload check at the end passed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "finetune_vipe.ipynb"
RELOAD_MARKER = "RELOAD CHECK PASSED"
KERNEL_NAME = "video2param-test"

TINY_SETTINGS = {
    "V2P_NB_STEPS": "6",
    "V2P_NB_BATCH": "8",
    "V2P_NB_TRAIN": "48",
    "V2P_NB_TEST": "20",
    # One thread: with pytest-xdist two workers share the cores, and oversubscribed OpenMP threads spin-wait.
    "V2P_NB_THREADS": "1",
}


def _read_notebook():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def test_notebook_has_one_parameters_cell_first():
    nb = _read_notebook()
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    tagged = [cell for cell in nb.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must carry the papermill 'parameters' tag"
    assert tagged[0] is code_cells[0], "the parameters cell must be the first code cell"
    # Every setting the test overrides is read in that cell, so the overrides reach the run.
    for name in TINY_SETTINGS:
        assert f'os.environ.get("{name}"' in tagged[0].source, f"{name} is not read in the parameters cell"


def test_notebook_outputs_are_cleared_or_complete():
    """Committed outputs are either absent, or a whole real run (every code cell executed, in order, no errors)."""
    nb = _read_notebook()
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code_cells]
    if all(count is None for count in counts) and not any(cell.outputs for cell in code_cells):
        return
    assert counts == list(range(1, len(code_cells) + 1)), f"partial or out-of-order run committed: {counts}"
    errors = [o for cell in code_cells for o in cell.outputs if o.output_type == "error"]
    assert not errors, "the committed outputs contain an error"
    assert any(RELOAD_MARKER in o.get("text", "") for cell in code_cells for o in cell.outputs)


def _kernel_spec_dir(tmp_path: Path) -> Path:
    """A kernelspec running ipykernel on *this* interpreter (the installed 'python3' spec may point elsewhere)."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "video2param test", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return tmp_path / "jupyter"


@pytest.mark.slow
def test_notebook_executes_with_tiny_settings(tmp_path, monkeypatch):
    import nbclient  # a dev dependency, like ipykernel (which the kernel below runs)

    out_dir = tmp_path / "run"
    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_spec_dir(tmp_path)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("V2P_NB_OUTPUT_DIR", str(out_dir))
    for name, value in TINY_SETTINGS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")

    nb = _read_notebook()
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=300, startup_timeout=120,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError (with the cell's traceback) when a cell fails

    text = "\n".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    assert RELOAD_MARKER in text, "the reload check cell did not report success"
    assert "overall:" in text, "the accuracy cell printed no overall accuracy"
    # The run wrote the adapter and the fine-tuned LM where the parameters said, and ran the steps it was told to.
    from video2param.serialization import CONFIG_NAME, WEIGHTS_NAME

    assert (out_dir / "adapter" / CONFIG_NAME).is_file() and (out_dir / "adapter" / WEIGHTS_NAME).is_file()
    assert any((out_dir / "llm").glob("*.safetensors"))
    assert f"{TINY_SETTINGS['V2P_NB_STEPS']} steps in" in text
