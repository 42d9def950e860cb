"""Token path: splice a video's embeddings into the prompt at its placeholder.

Each prompt carries at most one placeholder id. It is expanded to the context's N positions; the LLM's own
embeddings are looked up for the text and the video embeddings are written at the expanded positions with
``masked_scatter``. The placeholder's own embedding row is never looked up (it is swapped for a valid id first),
so the LLM's embedding matrix is not resized and ``unwrap()`` stays bit-identical. A prompt without the mark gets
the video at its start, after BOS. Attention masks carry the context's padding mask; labels at video positions
are -100.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..methods.base import TokenContext

IGNORE_INDEX = -100


@dataclass
class SplicedInputs:
    """Inputs with the video placeholder expanded: what the LLM receives on the token path."""

    input_ids: torch.Tensor  # (B, L'), placeholder ids at video positions
    inputs_embeds: torch.Tensor  # (B, L', D)
    attention_mask: torch.Tensor  # (B, L')
    video_positions: torch.Tensor  # (B, L') bool
    labels: torch.Tensor | None = None


def ensure_video_token(tokenizer, token: str) -> int:
    """The id of ``token`` in ``tokenizer``, adding it as a special token when missing."""
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        tokenizer.add_tokens([token], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == getattr(tokenizer, "unk_token_id", object()):
        raise ValueError(f"video_token: the tokenizer cannot represent {token!r}")
    return int(token_id)


def placeholder_positions(input_ids: torch.Tensor, video_token_id: int, attention_mask: torch.Tensor | None,
                          bos_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row's video goes, and whether the row had a mark.

    The position is the index of the row's placeholder, or (no mark) just after BOS / the first attended token.

    Raises ValueError when a row holds more than one placeholder.
    """
    is_mark = input_ids == video_token_id
    counts = is_mark.sum(dim=1)
    if (counts > 1).any():
        rows = torch.nonzero(counts > 1).flatten().tolist()
        raise ValueError(
            f"prompt rows {rows} contain more than one video placeholder; use exactly one mark per prompt "
            "(or none: the video then goes at the start)"
        )
    position = torch.argmax(is_mark.int(), dim=1)
    missing = counts == 0
    if missing.any():
        if attention_mask is None:
            first = torch.zeros_like(position)
        else:  # left padding: the first attended token
            first = torch.argmax(attention_mask.int(), dim=1)
        starts_with_bos = (
            input_ids.gather(1, first[:, None]).squeeze(1) == bos_token_id
            if bos_token_id is not None
            else torch.zeros_like(first, dtype=torch.bool)
        )
        insert_at = first + starts_with_bos.long()
        position = torch.where(missing, insert_at, position)
    return position, ~missing


def splice_video_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    context: TokenContext,
    embedding: nn.Module,
    video_token_id: int,
    bos_token_id: int | None = None,
    labels: torch.Tensor | None = None,
) -> SplicedInputs:
    """Expand each row's placeholder to ``context.num_tokens`` positions and write the video embeddings there."""
    batch, length = input_ids.shape
    if context.batch_size != batch:
        raise ValueError(f"videos: {context.batch_size} video(s) for a text batch of {batch}; pass one video per prompt")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    n = context.num_tokens
    position, has_mark = placeholder_positions(input_ids, video_token_id, attention_mask, bos_token_id)

    # Row b: new index of old token j is j + (n - 1) after a present mark, j + n after an inserted one.
    cols = torch.arange(length, device=input_ids.device)[None, :]
    shift = torch.where(has_mark, n - 1, n)[:, None]
    after = torch.where(has_mark[:, None], cols > position[:, None], cols >= position[:, None])
    new_index = cols + after.long() * shift
    keep = ~(has_mark[:, None] & (cols == position[:, None]))  # a present mark is replaced, not kept

    # Rows with a mark grow by n - 1, rows without by n: pad the former on the left to a common length
    # (left padding keeps generation right-aligned).
    row_len = length + shift.squeeze(1)
    new_len = int(row_len.max())
    left_pad = (new_len - row_len)[:, None]
    new_index = new_index + left_pad

    pad_id = 0
    out_ids = torch.full((batch, new_len), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    out_mask = torch.zeros((batch, new_len), dtype=attention_mask.dtype, device=input_ids.device)
    rows = torch.arange(batch, device=input_ids.device)[:, None].expand(batch, length)
    out_ids[rows[keep], new_index[keep]] = input_ids[keep]
    out_mask[rows[keep], new_index[keep]] = attention_mask[keep]

    video_start = position + left_pad.squeeze(1)
    video_cols = video_start[:, None] + torch.arange(n, device=input_ids.device)[None, :]
    video_positions = torch.zeros((batch, new_len), dtype=torch.bool, device=input_ids.device)
    video_positions.scatter_(1, video_cols, True)
    out_ids[video_positions] = video_token_id
    video_mask = torch.ones((batch, n), dtype=attention_mask.dtype, device=input_ids.device)
    if context.mask is not None:
        video_mask = context.mask.to(attention_mask.dtype)
    out_mask[video_positions] = video_mask.reshape(-1)

    lookup_ids = out_ids.masked_fill(video_positions, pad_id)  # never look up the placeholder's own row
    embeds = embedding(lookup_ids)
    video_embeds = context.embeds.to(device=embeds.device, dtype=embeds.dtype)
    embeds = embeds.masked_scatter(video_positions[..., None], video_embeds)

    out_labels = None
    if labels is not None:
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels: expected shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        out_labels = torch.full((batch, new_len), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
        out_labels[rows[keep], new_index[keep]] = labels[keep]
    return SplicedInputs(out_ids, embeds, out_mask, video_positions, out_labels)


def question_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, video_token_id: int | None,
                  labels: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) bool: the positions of the question — what a prompt-conditioned method may read.

    Padding and the ``<video>`` mark are never part of it; in teacher-forced training the answer (every position
    whose label is not -100) is not either, so a method sees the same question in training and in ``generate``.
    ``prompt_mask`` (True = question), when given, is used as is instead of the labels.
    """
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if prompt_mask is not None:
        if prompt_mask.shape != input_ids.shape:
            raise ValueError(f"prompt_mask: expected shape {tuple(input_ids.shape)}, got {tuple(prompt_mask.shape)}")
        mask = mask & prompt_mask.bool()
    elif labels is not None:
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels: expected shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        mask = mask & (labels == IGNORE_INDEX)
    if video_token_id is not None:
        mask = mask & (input_ids != video_token_id)
    return mask


@dataclass
class StrippedInputs:
    """A prompt batch with its ``<video>`` marks removed (what a weight-space method's LLM reads)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None


def strip_video_marks(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, video_token_id: int | None,
                      labels: torch.Tensor | None = None) -> StrippedInputs:
    """Remove each row's ``<video>`` mark; rows that lose a token are left-padded to a common length.

    Weight-space methods put the video in the weights: the mark must not reach the LLM as an ordinary (untrained)
    token, in training and in generation alike.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if video_token_id is None:
        return StrippedInputs(input_ids, attention_mask, labels)
    is_mark = input_ids == video_token_id
    if not bool(is_mark.any()):
        return StrippedInputs(input_ids, attention_mask, labels)
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels: expected shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    keep = ~is_mark
    batch, _ = input_ids.shape
    row_len = keep.sum(dim=1)
    new_len = int(row_len.max())
    new_index = keep.long().cumsum(dim=1) - 1 + (new_len - row_len)[:, None]
    rows = torch.arange(batch, device=input_ids.device)[:, None].expand_as(input_ids)
    out_ids = torch.zeros((batch, new_len), dtype=input_ids.dtype, device=input_ids.device)
    out_mask = torch.zeros((batch, new_len), dtype=attention_mask.dtype, device=input_ids.device)
    out_ids[rows[keep], new_index[keep]] = input_ids[keep]
    out_mask[rows[keep], new_index[keep]] = attention_mask[keep]
    out_labels = None
    if labels is not None:
        out_labels = torch.full((batch, new_len), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
        out_labels[rows[keep], new_index[keep]] = labels[keep]
    return StrippedInputs(out_ids, out_mask, out_labels)
