"""A small training loop with a progress bar (the demo uses it; notebooks can use HF Trainer instead)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class TrainConfig:
    steps: int = field(default=300, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=32, metadata={"help": "Samples per step."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup: int = field(default=20, metadata={"help": "Linear warm-up steps before cosine decay."})
    grad_clip: float = field(default=1.0, metadata={"help": "Clip the gradient norm to this value (0 = off)."})
    seed: int = field(default=0, metadata={"help": "Seed of the batch order."})
    log_every: int = field(default=50, metadata={"help": "Print the loss every n steps (0 = silent)."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar (elapsed time, ETA, loss)."})
    description: str = field(default="training", metadata={"help": "Label of the progress bar."})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")


@dataclass
class TrainResult:
    """Loss of every step and the wall time of the whole loop."""

    losses: list[float]
    seconds: float

    @property
    def step_time(self) -> float:
        """Mean seconds per optimizer step."""
        return self.seconds / max(len(self.losses), 1)

    def final_loss(self, last: int = 20) -> float:
        """Mean loss of the last ``last`` steps."""
        tail = self.losses[-last:]
        return sum(tail) / max(len(tail), 1)


def train(vm, dataset: Sequence, collate: Callable, config: TrainConfig,
          log: Callable[[str], None] = print) -> TrainResult:
    """Train the trainable parameters of ``vm`` (see ``vm.set_stage``) on ``dataset`` with AdamW + cosine.

    Batches are drawn in a seeded random order, one pass after another. The progress bar shows elapsed time, the
    ETA and the running loss; ``log`` gets a loss line every ``config.log_every`` steps.
    """
    from tqdm.auto import tqdm

    params = [p for p in vm.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train: nothing to train (stage 'frozen'?)")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(dataset), generator=generator).tolist()
    cursor = 0
    losses: list[float] = []
    vm.train()
    bar = tqdm(total=config.steps, desc=config.description, unit="step", disable=not config.progress, leave=False,
               dynamic_ncols=True)
    start = time.perf_counter()
    for step in range(config.steps):
        if cursor + config.batch_size > len(order):
            order = torch.randperm(len(dataset), generator=generator).tolist()
            cursor = 0
        items = [dataset[i] for i in order[cursor : cursor + config.batch_size]]
        cursor += config.batch_size
        batch = collate(items)
        loss = vm(input_ids=batch["input_ids"].to(vm.device), attention_mask=batch["attention_mask"].to(vm.device),
                  labels=batch["labels"].to(vm.device), videos=batch["videos"].to(vm.device),
                  frame_mask=_maybe_to(batch.get("frame_mask"), vm.device)).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train: loss became {loss.item()} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.update(1)
        if (step + 1) % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.3f}", refresh=False)
        if config.log_every and (step + 1) % config.log_every == 0:
            recent = losses[-config.log_every :]
            line = (f"  step {step + 1:>5}/{config.steps}  loss {sum(recent) / len(recent):.4f}  "
                    f"({time.perf_counter() - start:.0f}s)")
            bar.clear()
            log(line)
            bar.refresh()
    bar.close()
    vm.eval()
    return TrainResult(losses, time.perf_counter() - start)


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(config.steps - config.warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _maybe_to(t, device):
    return None if t is None else t.to(device)
