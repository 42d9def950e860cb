"""`VideoTrainer`: transformers' Trainer whose checkpoints are video2param adapters.

A plain ``Trainer`` saves a non-``PreTrainedModel`` as one safetensors state dict, which fails on tied embeddings
and would copy the whole LLM into every checkpoint. ``VideoTrainer`` writes each checkpoint as
``<checkpoint>/adapter`` (``VideoModel.save_pretrained``) plus, when the LLM trains too (stage ``sft``),
``<checkpoint>/llm`` (``VideoModel.save_base_model``), both loadable with the library's own ``from_pretrained``.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import Trainer

ADAPTER_SUBDIR = "adapter"
LLM_SUBDIR = "llm"


class VideoTrainer(Trainer):
    """A ``transformers.Trainer`` for a ``VideoModel`` (pass it as ``model=``)."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        from .model import VideoModel

        vm = self.accelerator.unwrap_model(self.model)
        if not isinstance(vm, VideoModel):
            raise TypeError(f"VideoTrainer: model must be a VideoModel, got {type(vm).__name__}")
        if not self.args.should_save:
            return
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        os.makedirs(output_dir, exist_ok=True)
        vm.save_pretrained(output_dir / ADAPTER_SUBDIR)
        if vm.stage == "sft":
            vm.save_base_model(output_dir / LLM_SUBDIR)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir / LLM_SUBDIR)
