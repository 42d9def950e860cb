"""`VideoTrainer`: transformers' Trainer whose checkpoints are video2param adapters, and which resumes from them.

Why a subclass: a plain ``Trainer`` treats a ``VideoModel`` (an ``nn.Module``, not a ``PreTrainedModel``) as a bare
state dict. It saves ``safetensors.save_file(model.state_dict())`` — the whole LLM and the vision tower in every
checkpoint, and an error for any LLM with tied input/output embeddings (safetensors refuses tensors that share
memory) — and resuming or ``load_best_model_at_end`` look for that ``model.safetensors`` only. ``VideoTrainer``
overrides exactly those three points (``_save``, ``_load_from_checkpoint``, ``_load_best_model``); the optimizer,
scheduler, gradient scaler, RNG states and trainer state are saved and restored by ``Trainer`` itself, unchanged.

A checkpoint ``<output_dir>/checkpoint-<step>/`` holds, besides Trainer's own files:

* ``adapter/``: ``VideoModel.save_pretrained`` (with a LoRA on the LLM: its PEFT adapter in ``adapter/llm_lora/``),
  loadable with ``VideoModel.from_pretrained``;
* ``llm/``: in stage ``sft`` without a LoRA, the whole fine-tuned LLM (``save_base_model``), and the tokenizer (it
  knows the ``<video>`` token).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer

__all__ = ["ADAPTER_SUBDIR", "LLM_SUBDIR", "VideoTrainer", "load_training_checkpoint", "save_training_checkpoint"]

ADAPTER_SUBDIR = "adapter"
LLM_SUBDIR = "llm"


class VideoTrainer(Trainer):
    """A ``transformers.Trainer`` for a ``VideoModel`` (pass it as ``model=``); see the module docstring.

    ``train(resume_from_checkpoint=...)`` restores the adapter (and the LLM's LoRA, or the whole LLM in stage
    ``sft``), the optimizer, the scheduler, the RNG states and the step; ``load_best_model_at_end=True`` loads the
    best checkpoint's weights back the same way.
    """

    def _video_model(self):
        from .model import VideoModel

        vm = self.accelerator.unwrap_model(self.model)
        if not isinstance(vm, VideoModel):
            raise TypeError(f"VideoTrainer: model must be a VideoModel, got {type(vm).__name__}")
        return vm

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Read before an engine shards the weights (FSDP, ZeRO-3), when every rank still holds the whole LLM.
        self._base_fingerprint = self._video_model().fingerprint
        self._tokenizer = self.processing_class  # saved into every checkpoint (llm/)

    def train(self, *args: Any, **kwargs: Any):
        """``Trainer.train``; a tokenizer given as ``processing_class`` is aligned with the LLM's config.

        (``Trainer.train`` aligns the tokenizer's special tokens with ``model.config``, which for a ``VideoModel`` is
        the adapter's config: the LLM's is the right one, so that step is done here and skipped there.)
        """
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.trainer_utils import align_special_tokens

        tokenizer = self.processing_class
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            return super().train(*args, **kwargs)
        align_special_tokens(self._video_model().llm, tokenizer)
        self.processing_class = None
        try:
            return super().train(*args, **kwargs)
        finally:
            self.processing_class = tokenizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        vm = self._video_model()
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is not None and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            # The engine gathered the full state dict for this rank: the live parameters hold only shards.
            save_training_checkpoint(vm, output_dir, tokenizer=self._tokenizer, state_dict=state_dict,
                                     fingerprint=self._base_fingerprint)
        else:
            save_training_checkpoint(vm, output_dir, tokenizer=self._tokenizer)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_training_checkpoint(self._video_model(), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_training_checkpoint(self._video_model(), self.state.best_model_checkpoint)


def save_training_checkpoint(vm, directory: str | os.PathLike, *, tokenizer: Any = None,
                             state_dict: dict[str, torch.Tensor] | None = None, fingerprint: Any = None) -> Path:
    """Write what training changes into ``directory``: ``adapter/`` always, ``llm/`` in stage ``sft`` without a LoRA
    on the LLM, and the tokenizer (into ``llm/``) when given (default: ``vm.tokenizer``).

    ``state_dict``: the full state dict of ``vm`` gathered by a sharding engine (FSDP ``FULL_STATE_DICT``, DeepSpeed
    ZeRO-3 with ``stage3_gather_16bit_weights_on_model_save``), written instead of the live (sharded) parameters,
    with ``fingerprint`` (``vm.fingerprint`` read before sharding) as the base model's fingerprint. Supported there:
    stage ``pretrain`` and stage ``sft`` with a LoRA on the LLM; a sharded full-LLM fine-tune raises ValueError.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if state_dict is None:
        vm.save_pretrained(directory / ADAPTER_SUBDIR)
        if _trains_whole_llm(vm):
            vm.save_base_model(directory / LLM_SUBDIR)
    else:
        _save_gathered(vm, directory / ADAPTER_SUBDIR, state_dict, fingerprint)
    tokenizer = tokenizer if tokenizer is not None else vm.tokenizer
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(directory / LLM_SUBDIR)
    return directory


def _save_gathered(vm, directory: Path, state_dict: dict[str, torch.Tensor], fingerprint: Any) -> None:
    """The adapter directory of ``vm.save_pretrained``, written from a gathered full state dict."""
    from .llm_lora import LORA_SUBDIR, llm_lora_config, save_llm_lora
    from .model import _vision_name
    from .model_card import render_model_card
    from .serialization import check_state, save_adapter

    if _trains_whole_llm(vm):
        raise ValueError(
            "stage 'sft' trains the whole LLM; under FSDP / ZeRO-3 save it with the engine's own checkpoints, or "
            "train a LoRA on the LLM instead (wrap_model(..., llm_lora=LoraConfig(...)))"
        )
    if fingerprint is None:
        raise ValueError("fingerprint: needed with state_dict= (vm.fingerprint read before the weights were sharded)")
    method = {k[len("method."):]: v for k, v in state_dict.items() if k.startswith("method.")}
    check_state(vm.adapter_state_dict(), method, "gathered state dict")
    entry = None
    if llm_lora_config(vm.llm) is not None:
        llm_state = {k[len("llm."):]: v for k, v in state_dict.items() if k.startswith("llm.")}
        entry = {"path": LORA_SUBDIR, "weights_sha256": save_llm_lora(vm.llm, directory / LORA_SUBDIR, llm_state)}
    vision_name = _vision_name(vm.vision)
    card = render_model_card(vm.config, fingerprint, method_kind=vm.method_kind,
                             num_parameters=sum(v.numel() for v in method.values()), vision_name=vision_name,
                             injected_layers=[s.layer for s in vm.llm_info.sites], metrics={})
    save_adapter(directory, vm.config, method, fingerprint, card,
                 extra={"vision_tower": vision_name, "metrics": {}, "llm_lora": entry})


def _trains_whole_llm(vm) -> bool:
    from .llm_lora import llm_lora_config

    return vm.stage == "sft" and llm_lora_config(vm.llm) is None


def load_training_checkpoint(vm, directory: str | os.PathLike) -> None:
    """Load a checkpoint written by :func:`save_training_checkpoint` into the live ``vm`` (in place).

    The adapter's config must be the model's; every tensor is checked (names, shapes, finite values) before any is
    copied. Raises FileNotFoundError naming a missing file and ValueError for a checkpoint that does not fit.
    """
    from .llm_lora import LORA_SUBDIR, llm_lora_config, llm_lora_live_names, load_llm_lora_state, read_llm_lora
    from .serialization import check_state, read_adapter

    directory = Path(directory)
    if not (directory / ADAPTER_SUBDIR).is_dir():
        raise FileNotFoundError(f"checkpoint {directory}: no {ADAPTER_SUBDIR}/ folder (not a VideoTrainer checkpoint)")
    loaded = read_adapter(directory / ADAPTER_SUBDIR)
    if loaded.config.to_dict() != vm.config.to_dict():
        raise ValueError(f"checkpoint {directory}: its adapter config differs from this model's "
                         f"(checkpoint: {loaded.config.to_dict()}; model: {vm.config.to_dict()})")
    check_state(vm.adapter_state_dict(), loaded.state, str(directory / ADAPTER_SUBDIR))
    entry = loaded.payload.get("llm_lora")
    has_lora = llm_lora_config(vm.llm) is not None
    if (entry is not None) != has_lora:
        raise ValueError(f"checkpoint {directory}: {'has' if entry else 'has no'} LoRA on the LLM, this model "
                         f"{'has' if has_lora else 'has none'}")
    lora_state = None
    if entry is not None:
        _, lora_state = read_llm_lora(directory / ADAPTER_SUBDIR / LORA_SUBDIR, expected_sha256=entry["weights_sha256"])
    if _is_sharded(vm):
        # FSDP2 / DTensor parameters: every rank passes the full tensors, torch keeps each rank's shard.
        if _trains_whole_llm(vm):
            raise ValueError("stage 'sft' trains the whole LLM; under FSDP resume it from the engine's own checkpoints")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full = {f"method.{k}": v for k, v in loaded.state.items()}
        if lora_state is not None:
            names = llm_lora_live_names(vm.llm)
            if set(names) != set(lora_state):
                raise ValueError(f"checkpoint {directory}: its LLM LoRA does not fit this model's")
            full.update({f"llm.{names[k]}": v for k, v in lora_state.items()})
        # In the model's own order on every rank (safetensors gives no fixed order): each tensor is a collective.
        full = {k: full[k] for k in vm.state_dict(keep_vars=True) if k in full}
        set_model_state_dict(vm, full, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    llm_state = _read_llm_weights(directory / LLM_SUBDIR) if _trains_whole_llm(vm) else None
    with torch.no_grad():
        vm.method.load_state_dict(loaded.state, strict=True)
        if lora_state is not None:
            load_llm_lora_state(vm.llm, lora_state)
        if llm_state is not None:
            _load_llm_weights(vm.llm, llm_state, directory / LLM_SUBDIR)


def _is_sharded(vm) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return any(isinstance(p, DTensor) for p in vm.method.parameters())


# ---- the whole LLM (stage sft without a LoRA) -----------------------------------------------------------------
def _read_llm_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of an HF checkpoint folder (one safetensors file, or shards listed in the index)."""
    from safetensors.torch import load_file

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(os.fspath(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(os.fspath(folder / shard)))
        return state
    raise FileNotFoundError(f"checkpoint {folder}: no model.safetensors (stage sft saves the LLM there)")


def _load_llm_weights(llm: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Copy an HF state dict (plain module names) into an LLM that carries video wrappers (``...q_proj.base``)."""
    from .inject.lowrank import LowRankWrapper

    wrappers = sorted((n for n, m in llm.named_modules() if isinstance(m, LowRankWrapper)), key=len, reverse=True)

    def live(name: str) -> str:
        for wrapper in wrappers:
            if name.startswith(wrapper + "."):
                return f"{wrapper}.base.{name[len(wrapper) + 1:]}"
        return name

    targets = llm.state_dict(keep_vars=True)
    mapped = {live(k): v for k, v in state.items()}
    unexpected = sorted(k for k in mapped if k not in targets)
    if unexpected:
        raise ValueError(f"checkpoint {where}: tensors this LLM does not have: {', '.join(unexpected[:4])}")
    loaded_ids = {id(targets[k]) for k in mapped}
    # HF drops tied copies (lm_head.weight = embed_tokens.weight) from the file: those are filled through the tie.
    missing = sorted(k for k, t in targets.items() if k not in mapped and id(t) not in loaded_ids)
    if missing:
        raise ValueError(f"checkpoint {where}: tensors missing from the file: {', '.join(missing[:4])}")
    for key, value in mapped.items():
        if targets[key].shape != value.shape:
            raise ValueError(f"checkpoint {where}: {key} has shape {tuple(value.shape)}, the LLM "
                             f"{tuple(targets[key].shape)}")
        targets[key].copy_(value)
