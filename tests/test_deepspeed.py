"""DeepSpeed ZeRO-2 and ZeRO-3 through VideoTrainer on two CPU processes (gloo): adapter checkpoints are written from
the engine's gathered state dict (and hold what the engine trained), and a resumed run continues with the same losses.

DeepSpeed is not a dependency: these tests run where it is installed (``pip install deepspeed``; on a CPU it builds
its shared-memory communication op with ninja on first use) and are skipped elsewhere. accelerate allows one
DeepSpeed Trainer per process, so every run is a spawn of its own.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

from safetensors.torch import load_file, save_file  # noqa: E402
from test_distributed import PER_DEVICE, WORLD, _build, _collate, _free_port, _Rows, _tok  # noqa: E402

STEPS = 4


def _config(stage: int) -> str:
    """The example config users are pointed to (docs/training.md)."""
    return str(Path(__file__).resolve().parents[1] / "examples" / f"deepspeed_zero{stage}.json")


def _worker(rank: int, port: int, out_dir: str, stage: int, resume: bool) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import deepspeed
    from transformers import TrainingArguments

    from video2param.trainer import VideoTrainer

    args = TrainingArguments(output_dir=os.path.join(out_dir, "resumed" if resume else "run"), max_steps=STEPS,
                             per_device_train_batch_size=PER_DEVICE,
                             learning_rate=1e-3, save_strategy="steps", save_steps=2, logging_steps=1, report_to=[],
                             use_cpu=True, remove_unused_columns=False, disable_tqdm=True, seed=7,
                             deepspeed=_config(stage))
    deepspeed.init_distributed(dist_backend="gloo")  # before the model: ZeRO-3 partitions it as it is built
    trainer = VideoTrainer(model=_build("vipe", lora=True), args=args, train_dataset=_Rows(_tok()),
                           data_collator=_collate)
    trainer.train(resume_from_checkpoint=os.path.join(out_dir, "run", "checkpoint-2") if resume else None)
    state = trainer.accelerator.get_state_dict(trainer.deepspeed)  # collective under ZeRO-3
    if rank == 0 and not resume:
        save_file({k: v.contiguous() for k, v in state.items() if k.startswith("method.")},
                  os.path.join(out_dir, "engine_state.safetensors"))
    if rank == 0:
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e and e["step"] > 2]
        with open(os.path.join(out_dir, f"losses_{int(resume)}.txt"), "w") as f:
            f.write(repr(losses))


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoints_are_adapters_and_resume_exactly(tmp_path, stage):
    for resume in (False, True):
        mp.spawn(_worker, args=(_free_port(), str(tmp_path), stage, resume), nprocs=WORLD, join=True)
    uninterrupted = ast.literal_eval((tmp_path / "losses_0.txt").read_text())
    resumed = ast.literal_eval((tmp_path / "losses_1.txt").read_text())
    assert len(uninterrupted) == 2 and resumed == pytest.approx(uninterrupted, abs=1e-6)
    adapter = tmp_path / "run" / f"checkpoint-{STEPS}" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "llm_lora").is_dir()
    # The checkpoint's adapter holds the weights the engine trained (gathered at the end of the run).
    engine = load_file(tmp_path / "engine_state.safetensors")
    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved.keys() == {k[len("method."):] for k in engine}
    for key, value in saved.items():
        torch.testing.assert_close(value, engine[f"method.{key}"].to(value.dtype), rtol=0, atol=0, msg=key)
