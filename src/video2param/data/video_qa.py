"""Video question-answering files in the LLaVA-Video / Video-ChatGPT format, loaded lazily.

One record per video and conversation, as a JSON Lines file (``.jsonl``, one object per line) or a JSON file holding
a list of them (``.json``)::

    {"video": "clips/a.mp4",
     "conversations": [{"from": "human", "value": "<video>\\nWhat is the man holding?"},
                       {"from": "gpt", "value": "A red umbrella."},
                       {"from": "human", "value": "Where is he going?"},
                       {"from": "gpt", "value": "Into the station."}]}

``video`` is relative to ``video_root`` (default: the data file's folder) or absolute. Roles: ``human``/``user``,
``gpt``/``assistant``, and an optional leading ``system``. The first human turn carries the video mark ``<video>``
(put there when absent); a conversation has at most one mark. Every row is checked when the file is opened, and a bad
row raises ``ValueError`` naming the file, the row and the problem; videos are decoded and encoded only when an item
is read (``VisionEncoder.encode_video``, with a ``FeatureCache`` on disk so each video is encoded once).

Each item is ``{"input_ids", "labels", "videos"}``: the conversation rendered with the tokenizer's chat template when
it has one (otherwise the library's prompt format, ``<video> question: ... answer:`` then the answer and the
end-of-sequence token, as ``video2param ask`` asks), and labels ``-100``
everywhere but on the answers (each assistant turn, with what the template puts after it, e.g. ``<|im_end|>``).
:meth:`VideoQADataset.collate` pads a batch for ``VideoModel.forward`` / ``transformers.Trainer``.

No ``datasets`` dependency: rows are a few hundred bytes of text held in memory, and everything heavy (decoding,
the vision tower) is lazy and cached on disk, which is what ``datasets.map`` would otherwise be used for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .collate import IGNORE_INDEX, format_prompt, stack_videos

__all__ = ["VIDEO_MARK", "VideoQADataset", "VideoQARecord", "question_prompt_ids", "read_video_qa"]

#: The video mark of the file format (replaced by the model's own video token when they differ).
VIDEO_MARK = "<video>"


def question_prompt_ids(tokenizer: Any, question: str, video_token: str = VIDEO_MARK) -> list[int]:
    """Token ids of a one-question prompt about a video, as :class:`VideoQADataset` renders the prompts it trains
    on: with the tokenizer's chat template when it has one (the video mark opening the user turn, the generation
    prompt added), else ``format_prompt``'s "<video> question: ... answer:"."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"{video_token}\n{question.strip()}"}],
                                             tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(format_prompt(question, video_token))["input_ids"])


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class VideoQARecord:
    """One checked row: the video file and the conversation as (role, text), roles user/assistant/system."""

    video: Path
    turns: tuple[tuple[str, str], ...]
    row: int  # 1-based: the line of a .jsonl file, the list position of a .json file


def read_video_qa(path: str | os.PathLike, video_root: str | os.PathLike | None = None,
                  check_videos: bool = True) -> list[VideoQARecord]:
    """Read and check every row of a ``.jsonl`` / ``.json`` video QA file (see the module docstring).

    Raises FileNotFoundError for a missing data file, ValueError naming the row for a bad one (not JSON, no video,
    a video file that does not exist when ``check_videos``, no human or no gpt turn, an unknown role, two video
    marks, a mark outside a human turn).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video QA file {path} does not exist")
    root = Path(video_root) if video_root is not None else path.parent
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json file must hold a list of records, got {type(data).__name__}")
        rows = list(enumerate(data, start=1))
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except ValueError as err:
                raise ValueError(f"{path}: row {number} is not valid JSON ({err})") from err
    if not rows:
        raise ValueError(f"{path}: no records")
    return [_check_row(record, number, path, root, check_videos) for number, record in rows]


def _check_row(record: Any, number: int, path: Path, root: Path, check_videos: bool) -> VideoQARecord:
    def bad(problem: str) -> ValueError:
        return ValueError(f"{path}: row {number}: {problem}")

    if not isinstance(record, dict):
        raise bad(f"expected a JSON object, got {type(record).__name__}")
    video = record.get("video")
    if not isinstance(video, str) or not video.strip():
        raise bad("no video (a 'video' entry with the file's path is required)")
    video_path = Path(video) if Path(video).is_absolute() else root / video
    if check_videos and not video_path.is_file():
        raise bad(f"video {video!r} not found (looked for {video_path})")
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise bad("no conversation (a non-empty 'conversations' list is required)")
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(conversations):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise bad(f"turn {i} must be an object with string 'from' and 'value'")
        role = _ROLES.get(turn["from"].strip().lower())
        if role is None:
            raise bad(f"turn {i} has the unknown role {turn['from']!r} (known: {', '.join(_ROLES)})")
        if role == "system" and i != 0:
            raise bad(f"turn {i}: a system turn may only come first")
        turns.append((role, turn["value"]))
    roles = [role for role, _ in turns]
    if "user" not in roles:
        raise bad("no human turn")
    if "assistant" not in roles:
        raise bad("no gpt turn (nothing to learn)")
    marks = [(i, role) for i, (role, value) in enumerate(turns) for _ in range(value.count(VIDEO_MARK))]
    if len(marks) > 1:
        raise bad(f"{len(marks)} video marks {VIDEO_MARK!r} (turns {', '.join(str(i) for i, _ in marks)}); one video "
                  "per conversation, marked once")
    if marks and marks[0][1] != "user":
        raise bad(f"the video mark {VIDEO_MARK!r} is in a {marks[0][1]} turn; it belongs in a human turn")
    if not marks:  # the LLaVA convention: the video opens the first human turn
        first = roles.index("user")
        turns[first] = ("user", f"{VIDEO_MARK}\n{turns[first][1]}")
    return VideoQARecord(video_path, tuple(turns), number)


class VideoQADataset(Dataset):
    """A video QA file as a ``torch`` dataset of tokenized conversations and video features (decoded lazily).

    Args:
        path: the ``.jsonl`` / ``.json`` file.
        tokenizer: the LLM's tokenizer; it must know ``video_token`` (``wrap_model(..., tokenizer=tok)`` adds it).
        encoder: the frozen ``VisionEncoder`` that turns a video file into features ``(T, P, Dv)`` (e.g. ``vm.vision``).
        num_frames: frames sampled per video (evenly over its duration, see docs/video.md).
        cache: a ``FeatureCache`` or a directory for one: each video is decoded and encoded once, then read back
            (default: the encoder's own cache, if it has one; else no cache).
        video_root: folder the videos' relative paths start from (default: the data file's folder).
        video_token: the model's video token (``vm.video_token``); the file's ``<video>`` marks become it.
        max_length: longest token sequence kept; a longer conversation loses its last turns (an item whose first
            answer does not fit raises ValueError naming the row). None keeps everything.
        check_videos: check up front that every video file exists.
    """

    def __init__(self, path: str | os.PathLike, tokenizer: Any, encoder: Any, *, num_frames: int = 8,
                 cache: Any = None, video_root: str | os.PathLike | None = None, video_token: str = VIDEO_MARK,
                 max_length: int | None = None, check_videos: bool = True) -> None:
        from ..video.cache import FeatureCache

        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames: expected a positive integer, got {num_frames!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 2):
            raise ValueError(f"max_length: expected an integer >= 2 or None, got {max_length!r}")
        if not hasattr(encoder, "encode_video"):
            raise ValueError(f"encoder: expected a VisionEncoder (or anything with encode_video), got "
                             f"{type(encoder).__name__}")
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer: it has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token)")
        ids = tokenizer(video_token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"tokenizer: it does not know the video token {video_token!r} as one token; wrap the "
                             f"model first (wrap_model adds it) or tokenizer.add_tokens([{video_token!r}], "
                             "special_tokens=True)")
        if cache is not None and not isinstance(cache, FeatureCache):
            cache = FeatureCache(cache)
        self.path = Path(path)
        self.records = read_video_qa(path, video_root, check_videos)
        self.tokenizer, self.encoder, self.cache = tokenizer, encoder, cache
        self.num_frames, self.video_token, self.max_length = num_frames, video_token, max_length
        self.uses_chat_template = bool(getattr(tokenizer, "chat_template", None))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        input_ids, labels = self.tokenize(record)
        return {"input_ids": input_ids, "labels": labels, "videos": self.features(record)}

    # ---- pieces ------------------------------------------------------------------------------------------------
    def features(self, record: VideoQARecord) -> torch.Tensor:
        """The video's features ``(T, P, Dv)``: decoded and encoded now, or read from the cache."""
        try:
            encoded = self.encoder.encode_video(record.video, num_frames=self.num_frames, cache=self.cache)
        except (OSError, ValueError) as err:
            raise ValueError(f"{self.path}: row {record.row}: cannot read video {record.video} ({err})") from err
        features = encoded.features
        return features.clone() if features.is_inference() else features  # usable in autograd (Trainer)

    def tokenize(self, record: VideoQARecord) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``labels`` (-100 except on the answers) of one conversation."""
        segments = self._segments(record)
        ids: list[int] = []
        labels: list[int] = []
        eos = None if self.uses_chat_template else self.tokenizer.eos_token_id  # templates end turns themselves
        for text, supervised, special in segments:
            piece = self.tokenizer(text, add_special_tokens=special)["input_ids"]
            if supervised and eos is not None:
                piece = piece + [eos]  # teaches the model to stop after the answer
            ids.extend(piece)
            labels.extend(piece if supervised else [IGNORE_INDEX] * len(piece))
        if self.max_length is not None and len(ids) > self.max_length:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            if all(label == IGNORE_INDEX for label in labels):
                raise ValueError(f"{self.path}: row {record.row}: the first answer does not fit in max_length="
                                 f"{self.max_length} tokens")
        return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)

    def _segments(self, record: VideoQARecord) -> list[tuple[str, bool, bool]]:
        """(text, supervised, add special tokens) pieces whose concatenation is the whole conversation."""
        turns = [(role, text.replace(VIDEO_MARK, self.video_token)) for role, text in record.turns]
        if self.uses_chat_template:
            return self._template_segments(record, turns)
        # Without a template: the library's prompt format (``format_prompt``, as MovingShapes and ``ask`` use it),
        # "<video> question: ... answer:" then " <answer></s>"; a system turn is plain text in front.
        segments: list[tuple[str, bool, bool]] = []
        for role, text in turns:
            if role == "assistant":
                segments.append((" " + text.strip(), True, False))  # the tokenize step appends eos to answers
            elif role == "user":
                mark = self.video_token if self.video_token in text else None
                question = " ".join(text.replace(self.video_token, " ").split())
                segments.append((format_prompt(question, mark), False, not segments))
            else:
                segments.append((text.strip(), False, not segments))  # bos (if any) once, in front
        return segments

    def _template_segments(self, record: VideoQARecord, turns) -> list[tuple[str, bool, bool]]:
        messages = [{"role": role, "content": text} for role, text in turns]
        segments: list[tuple[str, bool, bool]] = []
        done = ""
        for k, (role, _) in enumerate(turns):
            if role != "assistant":
                continue
            prompt = self.tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
            full = self.tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError(f"{self.path}: row {record.row}: the tokenizer's chat template does not render "
                                 "the conversation as a growing prefix; the answers cannot be located")
            segments.append((prompt[len(done):], False, False))
            segments.append((full[len(prompt):], True, False))
            done = full
        return segments

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad a batch (right padding) for ``VideoModel.forward``: ``input_ids``, ``attention_mask``, ``labels``,
        ``videos`` and ``frame_mask`` when the videos have different frame counts."""
        if not items:
            raise ValueError("cannot collate an empty batch")
        width = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, item in enumerate(items):
            n = len(item["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = item["input_ids"], item["labels"], 1
        videos, frame_mask = stack_videos([item["videos"] for item in items])
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "videos": videos}
        if frame_mask is not None:
            batch["frame_mask"] = frame_mask
        return batch
