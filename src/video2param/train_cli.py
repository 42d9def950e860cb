"""`video2param train DATA --llm NAME --vision NAME --method M --output DIR`: train a video adapter on a video QA file.

DATA is a LLaVA-Video / Video-ChatGPT ``.jsonl`` / ``.json`` file (see ``video2param.data.video_qa``). The run uses
``VideoTrainer`` (transformers' Trainer): a progress bar, evaluation on ``--eval-data`` every ``--eval-steps``,
checkpoints every ``--save-steps`` that a rerun of the same command resumes from (``--resume auto``), bf16 on a GPU
that has it. The output directory ends up with::

    DIR/adapter/          the trained adapter (VideoModel.from_pretrained(llm, "DIR/adapter")), llm_lora/ inside it
                          with --lora-rank
    DIR/llm/              the tokenizer (it knows <video>), and the LLM itself when it changed (stage sft without a
                          LoRA, or its embedding grew by the <video> row)
    DIR/checkpoint-N/     Trainer checkpoints
    DIR/feature_cache/    the vision tower's features of every video (``--cache`` to put it elsewhere)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["add_train_arguments", "run_train", "run_train_command"]


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``video2param train``."""
    parser.add_argument("data", help="Training file: .jsonl (one record per line) or .json (a list of records).")
    parser.add_argument("--llm", required=True, help="Base causal LM: a Hub name or a local directory.")
    parser.add_argument("--vision", required=True, help="Vision tower: a Hub name or a local directory.")
    parser.add_argument("--method", required=True, help="Video method (llava, vipe, ...).")
    parser.add_argument("--output", required=True, help="Output directory (adapter, checkpoints, feature cache).")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer name or path (default: --llm).")
    parser.add_argument("--eval-data", default=None, help="Held-out file in the same format, evaluated periodically.")
    parser.add_argument("--video-root", default=None, help="Folder of the videos' relative paths (default: the data "
                                                           "file's folder).")
    parser.add_argument("--adapter", default=None,
                        help="Start from a saved adapter (e.g. stage 1) instead of a new one.")
    parser.add_argument("--stage", choices=("pretrain", "sft"), default="pretrain",
                        help="pretrain: train the video adapter only; sft: also the LLM (a LoRA on it with "
                             "--lora-rank).")
    parser.add_argument("--lora-rank", type=int, default=0, help="Rank of a PEFT LoRA on the LLM in stage sft "
                                                                 "(0: train the whole LLM).")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank).")
    parser.add_argument("--lora-targets", default="all-linear",
                        help="Comma-separated module names for the LoRA, or all-linear (default).")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="Adapter option, repeatable: rank=16, inject_every=4, hidden_dim=256 (JSON values).")
    parser.add_argument("--frames", type=int, default=8, help="Frames sampled per video (default: 8).")
    parser.add_argument("--steps", type=int, default=None, help="Optimizer steps (default: --epochs passes).")
    parser.add_argument("--epochs", type=float, default=1.0, help="Passes over the data when --steps is not given.")
    parser.add_argument("--batch-size", type=int, default=8, help="Samples per device and step (default: 8).")
    parser.add_argument("--grad-accum", type=int, default=1, help="Gradient accumulation steps (default: 1).")
    parser.add_argument("--lr", type=float, default=1e-4, help="Peak learning rate (cosine, 3%% warm-up).")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0).")
    parser.add_argument("--max-length", type=int, default=None, help="Longest token sequence kept.")
    parser.add_argument("--eval-steps", type=int, default=500, help="Evaluate every n steps (with --eval-data).")
    parser.add_argument("--save-steps", type=int, default=500, help="Checkpoint every n steps.")
    parser.add_argument("--save-total-limit", type=int, default=3, help="Checkpoints kept (default: 3).")
    parser.add_argument("--logging-steps", type=int, default=10, help="Log the loss every n steps.")
    parser.add_argument("--resume", default="auto", help="auto: continue from the last checkpoint in --output if "
                                                         "there is one; no: start afresh; or a checkpoint directory.")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: bf16 on a GPU that supports it, else fp32.")
    parser.add_argument("--fsdp-config", default=None, metavar="JSON",
                        help="Shard with FSDP2 (launch with torchrun): Trainer's fsdp_config, e.g. "
                             "examples/fsdp2.json.")
    parser.add_argument("--deepspeed", default=None, metavar="JSON",
                        help="Train with DeepSpeed (launch with torchrun or deepspeed): a ZeRO config, e.g. "
                             "examples/deepspeed_zero3.json.")
    parser.add_argument("--cache", default=None, help="Feature cache directory (default: OUTPUT/feature_cache).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--push-to-hub", default=None, metavar="REPO", help="Upload the trained adapter to this Hub "
                                                                            "repo at the end.")
    parser.add_argument("--no-progress", action="store_true", help="Plain log lines instead of a progress bar.")


@dataclass
class TrainOutcome:
    """Where a run left its results."""

    adapter: Path
    llm: Path
    global_step: int
    metrics: dict[str, float]


def _parse_options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option: expected KEY=VALUE, got {pair!r}")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value  # a bare string
    return options


def _check_args(args: argparse.Namespace) -> None:
    for name in ("frames", "batch_size", "grad_accum", "eval_steps", "save_steps", "logging_steps", "save_total_limit"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps: expected a positive integer, got {args.steps}")
    if not args.lr > 0:
        raise ValueError(f"--lr: expected a positive number, got {args.lr}")
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank: expected 0 or a positive integer, got {args.lora_rank}")
    if args.fsdp_config and args.deepspeed:
        raise ValueError("--fsdp-config and --deepspeed: choose one engine")
    for label, value in (("--fsdp-config", args.fsdp_config), ("--deepspeed", args.deepspeed)):
        if value is not None and not Path(value).is_file():
            raise ValueError(f"{label}: no file at {value}")
    if args.lora_rank and args.stage != "sft":
        raise ValueError("--lora-rank: a LoRA on the LLM trains in stage sft; add --stage sft")
    for label, value in (("DATA", args.data), ("--eval-data", args.eval_data)):
        if value is not None and not Path(value).is_file():
            raise ValueError(f"{label}: no file at {value}")


def _use_bf16(precision: str) -> bool:
    import torch

    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _resume_from(setting: str, output: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    if setting == "no":
        return None
    if setting == "auto":
        return get_last_checkpoint(str(output)) if output.is_dir() else None
    if not Path(setting).is_dir():
        raise ValueError(f"--resume: no checkpoint directory at {setting}")
    return setting


def run_train(args: argparse.Namespace) -> TrainOutcome:
    """Run ``video2param train`` with parsed arguments; returns where the results are."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from .data.video_qa import VideoQADataset
    from .llm_lora import attach_llm_lora
    from .model import VideoModel, wrap_model
    from .trainer import VideoTrainer
    from .video.cache import FeatureCache
    from .video.encoder import VisionEncoder

    _check_args(args)
    output = Path(args.output)
    options = _parse_options(args.option)
    bf16 = _use_bf16(args.precision)

    # Before any model is built: with ZeRO-3 the LLM is then partitioned as it loads.
    training_args = TrainingArguments(
        output_dir=str(output),
        max_steps=args.steps if args.steps is not None else -1,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,  # a ratio of the total steps
        max_grad_norm=1.0,
        logging_steps=args.logging_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        eval_strategy="steps" if args.eval_data else "no",
        eval_steps=args.eval_steps if args.eval_data else None,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        dataloader_num_workers=0,  # the vision tower encodes in the main process (it may sit on the GPU)
        report_to=[],
        seed=args.seed,
        disable_tqdm=args.no_progress,
        fsdp=bool(args.fsdp_config),
        fsdp_config=args.fsdp_config,
        deepspeed=args.deepspeed,
    )
    if args.deepspeed:
        import deepspeed

        deepspeed.init_distributed()
    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.llm)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    llm = AutoModelForCausalLM.from_pretrained(args.llm)
    encoder = VisionEncoder.from_pretrained(args.vision, progress=False,
                                            cache=FeatureCache(args.cache or output / "feature_cache"))
    video_token = options.get("video_token", "<video>")
    tok.add_tokens([video_token], special_tokens=True)
    rows = llm.get_input_embeddings().num_embeddings
    resized = len(tok) > rows
    if resized:  # the <video> row is never looked up (see docs/architecture.md), but the id must exist
        if args.fsdp_config or args.deepspeed:
            raise ValueError(f"--llm: its embedding has no row for {video_token!r}; when sharding, resize it first "
                             "(tokenizer.add_tokens, llm.resize_token_embeddings, save both) and pass that")
        llm.resize_token_embeddings(len(tok))
    lora = None
    if args.lora_rank:
        from peft import LoraConfig

        targets = args.lora_targets if args.lora_targets == "all-linear" else [
            t.strip() for t in args.lora_targets.split(",") if t.strip()]
        lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank, target_modules=targets,
                          task_type="CAUSAL_LM")
    if args.adapter:
        if options:
            raise ValueError("--option: the options of --adapter are fixed; drop --option")
        vm = VideoModel.from_pretrained(llm, args.adapter, vision=encoder, tokenizer=tok, stage=args.stage)
        if lora is not None:
            attach_llm_lora(vm, lora)
    else:
        options.setdefault("num_frames", args.frames)
        vm = wrap_model(llm, method=args.method, vision=encoder, tokenizer=tok, stage=args.stage, llm_lora=lora,
                        **options)

    def dataset(path: str) -> VideoQADataset:
        return VideoQADataset(path, tok, encoder, num_frames=args.frames, video_root=args.video_root,
                              video_token=vm.video_token, max_length=args.max_length)

    train_set = dataset(args.data)
    eval_set = dataset(args.eval_data) if args.eval_data else None
    vm.print_trainable_parameters()
    trainer = VideoTrainer(model=vm, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
                           data_collator=train_set.collate, processing_class=tok)
    resume = _resume_from(args.resume, output)
    if resume:
        print(f"resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)
    metrics = {k: float(v) for k, v in trainer.evaluate().items() if isinstance(v, (int, float))} if eval_set else {}

    adapter_dir, llm_dir = output / "adapter", output / "llm"
    eval_metrics = {k: v for k, v in metrics.items() if k.startswith("eval_")}
    from .llm_lora import llm_lora_config

    llm_changed = resized or (vm.stage == "sft" and llm_lora_config(vm.llm) is None)
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        trainer.save_model(str(output))  # every rank: the engine gathers the sharded weights for the writer
        if not trainer.args.should_save:
            return TrainOutcome(adapter_dir, llm_dir, trainer.state.global_step, metrics)
    else:
        vm.save_pretrained(adapter_dir, metrics=eval_metrics)
        tok.save_pretrained(llm_dir)
        if llm_changed:
            vm.save_base_model(llm_dir)
    print(f"adapter saved to {adapter_dir}" + (f"; LLM and tokenizer to {llm_dir}" if llm_changed else
                                               f"; tokenizer to {llm_dir}"))
    print(f"ask it: video2param ask CLIP.mp4 \"QUESTION\" --adapter {adapter_dir} "
          f"--llm {llm_dir if llm_changed else args.llm} --tokenizer {llm_dir} --vision {args.vision}")
    if args.push_to_hub:
        from .hub import push_folder

        reference = push_folder(adapter_dir, args.push_to_hub,
                                commit_message=f"Upload {vm.config.method} video adapter")
        print(f"pushed the adapter to {args.push_to_hub} ({reference})")
    return TrainOutcome(adapter_dir, llm_dir, trainer.state.global_step, metrics)


def run_train_command(args: argparse.Namespace) -> int:
    """The CLI entry: errors in the inputs print one line and return 2."""
    try:
        run_train(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"video2param train: {err}", file=sys.stderr)
        return 2
    return 0
