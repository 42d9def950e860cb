"""Answer questions about video files with a saved adapter (`video2param ask`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


@contextmanager
def hf_progress_bars_off() -> Iterator[None]:
    """Silence transformers' own progress bars (loading or writing a tiny checkpoint) for a block, then restore."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class Asker:
    """A saved adapter, its LM, tokenizer and vision front end, loaded once to answer many questions.

    ``llm``: an HF causal LM name or directory (``video2param demo`` saves its trained LM with the tokenizer in
    ``<output>/<method>/llm``). ``vision``: an HF vision tower name or directory, or a directory written by
    :func:`video2param.data.features.save_vision` (the demo's ``<output>/vision``: its front end and the feature
    statistics the adapter was trained with). ``tokenizer`` defaults to ``llm``. Local paths load offline.
    """

    def __init__(self, *, adapter: str, llm: str, vision: str, tokenizer: str | None = None,
                 revision: str | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .data.features import load_vision
        from .model import VideoModel

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or llm)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.encoder, self.standardizer = load_vision(vision)
        with hf_progress_bars_off():
            model = AutoModelForCausalLM.from_pretrained(llm)
        self.model = VideoModel.from_pretrained(model, adapter, vision=self.encoder, tokenizer=self.tokenizer,
                                                revision=revision)
        self.model.eval()

    def features(self, video: str | Path | Any, frames: int | None = None) -> torch.Tensor:
        """``(T, P, Dv)`` features of a video file (or clip), encoded exactly as the training videos were."""
        from .video.io import load_video

        if isinstance(video, (str, Path)) and not Path(video).is_file():
            raise FileNotFoundError(f"no video file at {video}")
        clip = load_video(video, num_frames=frames or self.model.config.num_frames)
        with torch.inference_mode():
            features = self.encoder.encode_frames(clip.frames)
            return self.standardizer(features) if self.standardizer is not None else features

    def __call__(self, video: str | Path | Any, question: str, *, frames: int | None = None,
                 max_new_tokens: int = 32) -> str:
        """Greedy-decode the answer to ``question`` about ``video``."""
        from .data.video_qa import question_prompt_ids

        features = self.features(video, frames)
        tok = self.tokenizer
        # The prompt the adapter was trained on: the chat template when the tokenizer has one (as VideoQADataset).
        ids = torch.tensor([question_prompt_ids(tok, question, self.model.video_token)])
        prompt = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.inference_mode():
            out = self.model.generate(input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"],
                                      videos=features[None], max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def ask(video: str | Path, question: str, *, adapter: str, llm: str, vision: str, tokenizer: str | None = None,
        frames: int | None = None, max_new_tokens: int = 32, revision: str | None = None) -> str:
    """Load the base LM, the vision front end and the adapter, sample the video, and greedy-decode an answer.

    Arguments as :class:`Asker`; ``frames`` defaults to the adapter's ``num_frames``.
    """
    if not Path(video).is_file():
        raise FileNotFoundError(f"no video file at {video}")
    asker = Asker(adapter=adapter, llm=llm, vision=vision, tokenizer=tokenizer, revision=revision)
    return asker(video, question, frames=frames, max_new_tokens=max_new_tokens)
