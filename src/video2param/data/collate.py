"""Batching of :class:`VideoQA` samples for training and for evaluation.

Prompt format (one video placeholder, then the question, then the cue for the answer)::

    <bos> <video> question: what colour is the square? answer:   →   red </s>

``format_prompt`` builds the text; the tokenizer adds its own bos (if it has one). The answer is tokenized
separately with a leading space (so BPE tokenizers see the word-initial form, `` red``) and followed by eos.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from .moving_shapes import VideoQA

#: Words (and punctuation) the prompt adds around a question; a word tokenizer must know them.
PROMPT_WORDS: tuple[str, ...] = ("question", "answer", ":")
IGNORE_INDEX = -100  # label value that the cross-entropy loss skips


def format_prompt(question: str, video_token: str | None = "<video>") -> str:
    """The prompt text for ``question``: ``"<video> question: <question> answer:"`` (no placeholder when None)."""
    text = f"question: {question.strip()} answer:"
    return text if video_token is None else f"{video_token} {text}"


class VideoQACollator:
    """Turns a list of :class:`VideoQA` into model inputs.

    ``train=True`` → ``input_ids``, ``attention_mask``, ``labels`` (prompt and padding set to -100, the answer and
    eos supervised) and ``videos`` (B, T, 3, H, W). ``train=False`` → the prompt only, plus ``answers``,
    ``qtypes`` and ``questions`` (lists of str) for scoring. When the clips have different lengths the videos are
    zero-padded to the longest and ``frame_mask`` (B, Tmax) bool marks the real frames.

    ``padding_side`` defaults to right for training and left for evaluation (generation continues from the last
    column, so every prompt must end there). ``video_token=None`` leaves the placeholder out of the prompt.
    """

    def __init__(self, tokenizer: Any, video_token: str | None = "<video>",
                 padding_side: Literal["left", "right"] | None = None, train: bool = True) -> None:
        if padding_side is None:
            padding_side = "right" if train else "left"
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "the tokenizer has no pad token; set one first (e.g. tokenizer.pad_token = tokenizer.eos_token)"
            )
        if video_token is not None:
            ids = tokenizer(video_token, add_special_tokens=False)["input_ids"]
            if video_token not in tokenizer.get_vocab() or len(ids) != 1:
                raise ValueError(
                    f"the tokenizer does not know the video token {video_token!r}; wrap the model first "
                    f"(wrap_model adds it) or add it yourself: tokenizer.add_tokens([{video_token!r}], "
                    "special_tokens=True)"
                )
        self.tokenizer = tokenizer
        self.video_token = video_token
        self.padding_side = padding_side
        self.train = train

    def __call__(self, items: Sequence[VideoQA]) -> dict[str, Any]:
        if len(items) == 0:
            raise ValueError("cannot collate an empty batch")
        tok = self.tokenizer
        sequences: list[list[int]] = []
        labels: list[list[int]] = []
        for item in items:
            prompt = tok(format_prompt(item.question, self.video_token))["input_ids"]
            if not self.train:
                sequences.append(prompt)
                continue
            answer = tok(" " + item.answer.strip(), add_special_tokens=False)["input_ids"]
            if tok.eos_token_id is not None:
                answer = answer + [tok.eos_token_id]  # teaches the model to stop after the answer
            sequences.append(prompt + answer)
            labels.append([IGNORE_INDEX] * len(prompt) + answer)

        batch: dict[str, Any] = {}
        batch["input_ids"], batch["attention_mask"] = self._pad(sequences, tok.pad_token_id)
        if self.train:
            batch["labels"], _ = self._pad(labels, IGNORE_INDEX)
        videos, frame_mask = stack_videos([item.video for item in items])
        batch["videos"] = videos
        if frame_mask is not None:
            batch["frame_mask"] = frame_mask
        if not self.train:
            batch["answers"] = [item.answer for item in items]
            batch["qtypes"] = [item.qtype for item in items]
            batch["questions"] = [item.question for item in items]
        return batch

    def _pad(self, rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), value, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if self.padding_side == "left" else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return ids, mask


def stack_videos(videos: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack clips (T, 3, H, W) — or pre-encoded features (T, P, Dv) — into a batch with a leading B axis;
    zero-pad shorter clips and return their frame mask.

    The mask is None when all clips have the same length. Raises ``ValueError`` when frame shapes differ.
    """
    for i, video in enumerate(videos):
        if not isinstance(video, torch.Tensor) or video.dim() not in (3, 4):
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"video {i}: expected frames (T, C, H, W) or features (T, P, Dv), got {shape}")
        if video.shape[0] == 0:
            raise ValueError(f"video {i}: the clip has no frames")
        if video.shape[1:] != videos[0].shape[1:]:
            raise ValueError(
                f"video {i}: frame shape {tuple(video.shape[1:])} differs from {tuple(videos[0].shape[1:])}; "
                "resize clips to one frame size before batching"
            )
    lengths = [video.shape[0] for video in videos]
    if len(set(lengths)) == 1:
        return torch.stack(list(videos)), None
    longest = max(lengths)
    out = videos[0].new_zeros((len(videos), longest, *videos[0].shape[1:]))
    frame_mask = torch.zeros((len(videos), longest), dtype=torch.bool)
    for i, video in enumerate(videos):
        out[i, : video.shape[0]] = video
        frame_mask[i, : video.shape[0]] = True
    return out, frame_mask
