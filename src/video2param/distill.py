"""Distillation of a teacher that reads the video in context into a weight-space student (Video2LoRA).

Only the student's method (the hypernetwork) trains; the LLM and the teacher's token adapter stay frozen. Targets
are the dataset's answers or the teacher's own greedy answers with the video in context (``teacher_answers``,
generated once and cached on disk). The loss per batch (``DistillLoss``):

* cross-entropy of the student (LLM + generated LoRA, no visual token) on the answer tokens, a token mean per
  sample, then the mean over samples;
* optionally ``kl_weight`` × forward KL(teacher ‖ student) over the vocabulary at the answer positions, at
  temperature T, × T² (the teacher runs with the video spliced in, under no_grad);
* optionally ``l1_weight`` × the mean |A| + mean |B| of the generated factors (the static bias LoRA excluded).

Recipe defaults (the public Video2LoRA code): AdamW lr 1e-4, weight decay 0.01, cosine with 3% linear warm-up,
gradient clipping at 1.0. ``distill`` is a small loop; ``DistillTrainer`` is the same loss in ``transformers.Trainer``
(``distill_training_arguments`` gives the recipe). Both work with gradient checkpointing of the LLM.

Long videos: the method cuts a video into segments of the training length and composes their LoRAs. A chunk
training stage is simply this loss on videos of 1..k segments (batches may mix lengths; shorter videos are padded
and their missing segments add nothing).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .data.collate import IGNORE_INDEX, VideoQACollator
from .inject.tokens import strip_video_marks
from .methods.base import WeightContext
from .train import TrainResult
from .trainer import VideoTrainer
from .validation import check_fields

__all__ = [
    "DistillConfig",
    "DistillLoss",
    "DistillTrainer",
    "Distiller",
    "answer_logits",
    "distill",
    "distill_training_arguments",
    "forward_kl",
    "teacher_answers",
    "with_answers",
]


@dataclass
class DistillConfig:
    """Loss weights and the optimisation recipe (defaults: the public Video2LoRA code)."""

    steps: int = field(default=300, metadata={"help": "Optimizer steps.", "min": 1})
    batch_size: int = field(default=32, metadata={"help": "Samples per step.", "min": 1})
    lr: float = field(default=1e-4, metadata={"help": "Peak learning rate (AdamW).", "gt": 0})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay.", "min": 0})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Fraction of the steps with a linear warm-up "
                                                                "before the cosine decay.", "min": 0, "max": 1})
    grad_clip: float = field(default=1.0, metadata={"help": "Clip the gradient norm to this value (0 = off).",
                                                    "min": 0})
    kl_weight: float = field(default=0.0, metadata={"help": "Weight of KL(teacher ‖ student) at the answer "
                                                            "positions (0 = off; public script 0.05).", "min": 0})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature T of the KL term (scaled by T²).",
                                                      "gt": 0})
    l1_weight: float = field(default=0.0, metadata={"help": "Weight of the L1 penalty on the generated A and B "
                                                            "(0 = off; Doc-to-LoRA 0.1).", "min": 0})
    seed: int = field(default=0, metadata={"help": "Seed of the batch order."})
    log_every: int = field(default=50, metadata={"help": "Print the loss every n steps (0 = silent).", "min": 0})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})
    description: str = field(default="distilling", metadata={"help": "Label of the progress bar."})

    def __post_init__(self) -> None:
        check_fields(self, "")

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.warmup_ratio * self.steps)


@dataclass
class DistillLoss:
    """The loss of one batch and its parts (the parts are detached, for logging)."""

    total: torch.Tensor
    ce: float
    kl: float = 0.0
    l1: float = 0.0


def answer_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits predicting each answer token, row by row: (N, V), their targets (N,) and sample index (N,).

    Position j predicts label j + 1 (the usual causal shift); answer tokens are the labels that are not -100.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"labels: expected shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    targets = labels[:, 1:]
    where = targets != IGNORE_INDEX
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)
    return logits[:, :-1][where], targets[where], rows[where]


def _per_sample_mean(values: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """Token mean within each sample, then the mean over the samples that have tokens."""
    sums = values.new_zeros(batch).index_add(0, rows, values)
    counts = values.new_zeros(batch).index_add(0, rows, torch.ones_like(values))
    has = counts > 0
    return (sums[has] / counts[has]).mean()


class Distiller:
    """Computes the distillation loss of a batch for a weight-space student that has a teacher (``vm.teacher``).

    A batch holds ``input_ids``, ``attention_mask``, ``labels`` (answer tokens, -100 elsewhere), ``videos`` and
    optionally ``frame_mask``, as ``VideoQACollator(train=True)`` makes them.
    """

    def __init__(self, vm: Any, *, kl_weight: float = 0.0, temperature: float = 1.0, l1_weight: float = 0.0) -> None:
        if vm.method_kind != "weights":
            raise ValueError(f"distill: the student must be a weight-space method, got {vm.config.method!r}")
        if kl_weight < 0 or l1_weight < 0 or not temperature > 0:
            raise ValueError(f"distill: kl_weight and l1_weight must be >= 0 and temperature > 0, got "
                             f"{kl_weight}, {l1_weight}, {temperature}")
        if kl_weight > 0 and getattr(vm, "teacher", None) is None:
            raise ValueError("distill: kl_weight > 0 needs the student's teacher (wrap_model(teacher=...))")
        if l1_weight > 0 and not hasattr(vm.method, "split_bias"):
            raise ValueError(f"distill: l1_weight needs a method that can split off its static part, "
                             f"{vm.config.method!r} cannot")
        self.vm = vm
        self.kl_weight, self.temperature, self.l1_weight = kl_weight, temperature, l1_weight

    def loss(self, batch: dict[str, Any]) -> DistillLoss:
        vm = self.vm
        device = vm.device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        labels = batch["labels"].to(device)
        videos = batch["videos"]
        videos = videos.to(device) if isinstance(videos, torch.Tensor) else videos
        frame_mask = batch.get("frame_mask")
        frame_mask = None if frame_mask is None else frame_mask.to(device)
        context = vm.encode_video(videos, frame_mask)
        logits = vm(input_ids=ids, attention_mask=mask, context=context).logits
        # The weight path drops the <video> mark before the LLM: drop it from the labels the same way.
        student, targets, rows = answer_logits(logits, strip_video_marks(ids, mask, vm.video_token_id, labels).labels)
        if targets.numel() == 0:
            raise ValueError("distill: the batch has no answer token (every label is -100)")
        ce = _per_sample_mean(F.cross_entropy(student.float(), targets, reduction="none"), rows, ids.shape[0])
        total, kl_value, l1_value = ce, 0.0, 0.0
        if self.kl_weight > 0:
            teacher = self.teacher_logits(ids, mask, labels, videos, frame_mask)
            kl = forward_kl(teacher, student, rows, ids.shape[0], self.temperature)
            total = total + self.kl_weight * kl
            kl_value = float(kl.detach())
        if self.l1_weight > 0:
            l1 = generated_l1(vm.method.split_bias(context)[0])
            total = total + self.l1_weight * l1
            l1_value = float(l1.detach())
        return DistillLoss(total, float(ce.detach()), kl_value, l1_value)

    @torch.no_grad()
    def teacher_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                       videos: Any, frame_mask: torch.Tensor | None) -> torch.Tensor:
        """The teacher's logits (video in context) at the answer positions, aligned with ``answer_logits``."""
        teacher = self.vm.teacher
        marks = (input_ids == self.vm.video_token_id).sum(dim=1)
        if not bool((marks == 1).all()):
            raise ValueError("distill: the KL term needs every prompt to hold the video mark once (the teacher "
                             "splices the video there)")
        logits = teacher(input_ids=input_ids, attention_mask=attention_mask, videos=videos,
                         frame_mask=frame_mask).logits
        # Every row's mark became the same number of video positions: text positions shift by one constant.
        shift = logits.shape[1] - input_ids.shape[1]
        return answer_logits(logits[:, shift:], labels)[0]


def forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, rows: torch.Tensor, batch: int,
               temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) of the softmaxes at temperature T, per token (N, V) → token mean per sample, mean
    over samples, × T² (so its gradient keeps the scale of the cross-entropy's as T changes)."""
    t = temperature
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    per_token = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return _per_sample_mean(per_token, rows, batch) * t * t


def generated_l1(context: WeightContext) -> torch.Tensor:
    """Mean |A| + mean |B| over the context's factors."""
    a = torch.stack([d.A.abs().mean() for d in context.deltas.values()]).mean()
    b = torch.stack([d.B.abs().mean() for d in context.deltas.values()]).mean()
    return a + b


def _check_student(vm: Any) -> list[torch.nn.Parameter]:
    """Put the student in stage pretrain (only the method trains) and return the method's parameters."""
    vm.set_stage("pretrain")
    params = [p for p in vm.method.parameters() if p.requires_grad]
    if not params:
        raise ValueError("distill: the student's method has no trainable parameter")
    others = [n for n, p in vm.named_parameters() if p.requires_grad and not n.startswith("method.")]
    if others:
        raise ValueError(f"distill: parameters outside the method would train: {others[:3]}")
    return params


def distill(vm: Any, dataset: Sequence, collate: Callable, config: DistillConfig,
            log: Callable[[str], None] = print) -> TrainResult:
    """Train the student's hypernetwork on ``dataset`` (only the method's parameters change).

    Batches are drawn in a seeded random order, pass after pass. Returns the total loss of every step.
    """
    from tqdm.auto import tqdm

    params = _check_student(vm)
    distiller = Distiller(vm, kl_weight=config.kl_weight, temperature=config.temperature,
                          l1_weight=config.l1_weight)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, config.steps,
                                                                                         config.warmup_steps))
    generator = torch.Generator().manual_seed(config.seed)
    order, cursor = torch.randperm(len(dataset), generator=generator).tolist(), 0
    losses: list[float] = []
    vm.train()
    bar = tqdm(total=config.steps, desc=config.description, unit="step", disable=not config.progress, leave=False,
               dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for step in range(config.steps):
            if cursor + config.batch_size > len(order):
                order, cursor = torch.randperm(len(dataset), generator=generator).tolist(), 0
            batch = collate([dataset[i] for i in order[cursor: cursor + config.batch_size]])
            cursor += config.batch_size
            result = distiller.loss(batch)
            if not torch.isfinite(result.total):
                raise FloatingPointError(f"distill: loss became {result.total.item()} at step {step}; "
                                         "lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            result.total.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            schedule.step()
            losses.append(float(result.total.detach()))
            bar.update(1)
            if config.log_every and (step + 1) % config.log_every == 0:
                recent = losses[-config.log_every:]
                bar.clear()
                log(f"  step {step + 1:>5}/{config.steps}  loss {sum(recent) / len(recent):.4f}  (ce {result.ce:.4f}"
                    f", kl {result.kl:.4f}, l1 {result.l1:.4f}; {time.perf_counter() - start:.0f}s)")
                bar.refresh()
    finally:
        bar.close()
        vm.eval()
    return TrainResult(losses, time.perf_counter() - start)


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# ---- teacher targets -----------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_answers(teacher: Any, items: Sequence, *, max_new_tokens: int = 64, batch_size: int = 32,
                    cache: str | Path | None = None) -> list[str]:
    """The teacher's greedy answers (video in context) to every item's question, generated once.

    ``items`` are ``VideoQA``-like (``video``, ``question``); ``teacher`` a token ``VideoModel`` with a tokenizer.
    With ``cache`` (a JSON file), answers are read from it when it was made for the same questions, videos and
    teacher weights, and written to it otherwise.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if teacher.method_kind != "tokens":
        raise ValueError(f"teacher: expected a token adapter that reads the video, got {teacher.config.method!r}")
    key = _targets_key(teacher, items, max_new_tokens) if cache is not None else None
    if cache is not None and Path(cache).is_file():
        try:
            stored = json.loads(Path(cache).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"cache: {cache} is not a teacher-answers JSON file ({err})") from err
        if isinstance(stored, dict) and stored.get("key") == key:
            return list(stored["answers"])
    tok = teacher.tokenizer
    collate = VideoQACollator(tok, teacher.video_token, padding_side="left", train=False)
    answers: list[str] = []
    was_training = teacher.training
    teacher.eval()
    try:
        for start in range(0, len(items), batch_size):
            batch = collate([items[i] for i in range(start, min(start + batch_size, len(items)))])
            frame_mask = batch.get("frame_mask")
            out = teacher.generate(input_ids=batch["input_ids"].to(teacher.device),
                                   attention_mask=batch["attention_mask"].to(teacher.device),
                                   videos=batch["videos"].to(teacher.device),
                                   frame_mask=None if frame_mask is None else frame_mask.to(teacher.device),
                                   max_new_tokens=max_new_tokens, do_sample=False)
            new = out[:, batch["input_ids"].shape[1]:]
            answers.extend(text.strip() for text in tok.batch_decode(new.tolist(), skip_special_tokens=True))
    finally:
        teacher.train(was_training)
    if cache is not None:
        from .atomic_files import write_bytes_atomically

        payload = json.dumps({"key": key, "answers": answers}, indent=1) + "\n"
        write_bytes_atomically(Path(cache), payload.encode("utf-8"))
    return answers


def _targets_key(teacher: Any, items: Sequence, max_new_tokens: int) -> str:
    from .video.digest import tensor_digest

    weights = tensor_digest(sorted(teacher.adapter_state_dict().items()))
    videos = tensor_digest((str(i), items[i].video) for i in range(len(items)))
    questions = json.dumps([items[i].question for i in range(len(items))])
    import hashlib

    return hashlib.blake2b(f"{weights}|{videos}|{questions}|{max_new_tokens}".encode(), digest_size=16).hexdigest()


def with_answers(items: Sequence, answers: Sequence[str]) -> list:
    """Copies of ``items`` whose answers are ``answers`` (e.g. the teacher's), for the usual collator."""
    if len(items) != len(answers):
        raise ValueError(f"answers: {len(answers)} answers for {len(items)} items")
    return [dataclasses.replace(items[i], answer=a) for i, a in enumerate(answers)]


# ---- transformers.Trainer --------------------------------------------------------------------------------------
class DistillTrainer(VideoTrainer):
    """``VideoTrainer`` whose loss is the distillation loss (``Distiller``); only the student's method trains.

    ``DistillTrainer(model=student, args=distill_training_arguments(dir), train_dataset=..., data_collator=...,
    kl_weight=0.05, temperature=1.0, l1_weight=0.0)``.
    """

    def __init__(self, *args: Any, kl_weight: float = 0.0, temperature: float = 1.0, l1_weight: float = 0.0,
                 **kwargs: Any) -> None:
        model = kwargs.get("model", args[0] if args else None)
        if model is None:
            raise ValueError("DistillTrainer: pass model= (the student VideoModel)")
        _check_student(model)
        self.distiller = Distiller(model, kl_weight=kl_weight, temperature=temperature, l1_weight=l1_weight)
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        result = self.distiller.loss(inputs)
        return (result.total, {"loss": result.total}) if return_outputs else result.total


def distill_training_arguments(output_dir: str | Path, **overrides: Any):
    """``TrainingArguments`` with the Video2LoRA recipe (AdamW lr 1e-4, wd 0.01, cosine, 3% warm-up, clip 1.0)."""
    from transformers import TrainingArguments

    # transformers 5 reads a float warmup_steps in [0, 1) as a ratio of the total steps.
    defaults: dict[str, Any] = dict(learning_rate=1e-4, weight_decay=0.01, lr_scheduler_type="cosine",
                                    warmup_steps=0.03, max_grad_norm=1.0, optim="adamw_torch",
                                    remove_unused_columns=False, report_to=[])
    return TrainingArguments(output_dir=str(output_dir), **{**defaults, **overrides})
