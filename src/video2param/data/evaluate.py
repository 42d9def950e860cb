"""Accuracy of a video model on a :class:`VideoQA` dataset, per question type, per category and overall."""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .collate import VideoQACollator
from .moving_shapes import QUESTION_TYPES, VideoQA


def evaluate(vm: Any, dataset: Sequence[VideoQA], batch_size: int = 32, max_new_tokens: int = 2,
             include_video_token: bool = True,
             video_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
             progress: bool = False) -> dict[str, float]:
    """Greedy-decode an answer for every sample of ``dataset`` and score exact matches.

    ``vm`` needs ``tokenizer`` (holding the video token), ``video_token``, ``device`` and
    ``generate(input_ids=, attention_mask=, videos=, frame_mask=, max_new_tokens=, do_sample=False)`` returning
    (B, prompt length + new tokens) for left-padded prompts. The prediction is the first word of the generated text
    (up to the first eos, special tokens dropped, case and surrounding punctuation ignored); with a word tokenizer
    that is the first generated token.

    ``include_video_token=False`` leaves the placeholder out of the prompts (for methods that take the video
    outside the token stream). ``video_transform`` maps each batch of videos (B, T, 3, H, W) before ``generate``,
    e.g. to cached features. ``progress=True`` shows a progress bar over the questions (elapsed time, ETA).

    Returns accuracies in [0, 1] keyed by each question type present, by category (``static``, ``temporal``) and
    ``overall``. The model runs in eval mode under ``torch.inference_mode``; its training flag is restored.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    if len(dataset) == 0:
        raise ValueError("evaluate: the dataset is empty")
    tokenizer = vm.tokenizer
    collate = VideoQACollator(tokenizer, vm.video_token if include_video_token else None, padding_side="left",
                              train=False)
    seen: Counter[str] = Counter()
    correct: Counter[str] = Counter()
    was_training = bool(getattr(vm, "training", False))
    vm.eval()
    from tqdm.auto import tqdm

    bar = tqdm(total=len(dataset), desc="evaluating", unit="question", disable=not progress, leave=False,
               dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for start in range(0, len(dataset), batch_size):
                items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                batch = collate(items)
                predictions = _generate_words(vm, batch, tokenizer, max_new_tokens, video_transform)
                for item, predicted in zip(items, predictions):
                    hit = predicted == _normalise(item.answer)
                    for key in (item.qtype, item.category, "overall"):
                        seen[key] += 1
                        correct[key] += hit
                bar.update(len(items))
    finally:
        bar.close()
        vm.train(was_training)
    # Question types first (benchmark order, then any others), then categories, then overall.
    order = [q for q in QUESTION_TYPES if q in seen] + sorted(k for k in seen if k not in QUESTION_TYPES
                                                              and k not in ("static", "temporal", "overall"))
    order += [k for k in ("static", "temporal", "overall") if k in seen]
    return {key: correct[key] / seen[key] for key in order}


def _generate_words(vm: Any, batch: dict[str, Any], tokenizer: Any, max_new_tokens: int,
                    video_transform: Callable[[torch.Tensor], torch.Tensor] | None) -> list[str]:
    device = vm.device
    input_ids = batch["input_ids"].to(device)
    videos = batch["videos"]
    if video_transform is not None:
        videos = video_transform(videos)
    frame_mask = batch.get("frame_mask")
    out = vm.generate(
        input_ids=input_ids,
        attention_mask=batch["attention_mask"].to(device),
        videos=videos.to(device) if isinstance(videos, torch.Tensor) else videos,
        frame_mask=frame_mask.to(device) if frame_mask is not None else None,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    prompt_len = input_ids.shape[1]
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != input_ids.shape[0] \
            or out.shape[1] < prompt_len or not torch.equal(out[:, :prompt_len].to(input_ids.device), input_ids):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"vm.generate must return (batch, prompt length + new tokens) starting with the prompt; got {shape} "
            f"for a prompt of shape {tuple(input_ids.shape)}"
        )
    words = []
    for row in out[:, prompt_len:].tolist():
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        text = tokenizer.decode(row, skip_special_tokens=True).split()
        words.append(_normalise(text[0]) if text else "")
    return words


def _normalise(word: str) -> str:
    return word.strip().strip(string.punctuation).lower()
