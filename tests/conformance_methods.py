"""Methods defined in the tests: they must pass the same conformance battery as the built-in ones.

``PromptPool`` is a token method conditioned on the question (like LinVT/PPLLaVA): it records the ``Conditioning``
it was given, so tests can check that the answer and the ``<video>`` mark never reach it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from video2param import TokenContext, VideoMethod, register_method
import weight_method  # noqa: F401  (registers pooled_delta_test)


@dataclass
class PromptPoolOptions:
    tokens: int = field(default=3, metadata={"help": "Output tokens per video."})


@register_method(overwrite=True)
class PromptPool(VideoMethod):
    """Per-frame mean features + the question's mean embedding → a few tokens."""

    name = "prompt_pool_test"
    kind = "tokens"
    Options = PromptPoolOptions
    needs = frozenset({"prompt", "prompt_embeds", "prompt_text"})

    def __init__(self, config, llm):
        super().__init__(config, llm)
        d = llm.hidden_size
        self.video_proj = nn.Linear(self.vision_width, d)
        self.text_proj = nn.Linear(d, d)
        self.slots = nn.Parameter(torch.randn(self.options.tokens, d) * 0.1)
        self.last_cond = None

    def encode(self, features, frame_mask=None, cond=None):
        self.last_cond = cond
        video = self.video_proj(features.mean(dim=(1, 2)))  # (B, D)
        m = cond.prompt.mask[..., None].to(cond.prompt.embeds.dtype)
        question = (cond.prompt.embeds * m).sum(1) / m.sum(1).clamp_min(1.0)
        return TokenContext(self.slots[None] + (video + self.text_proj(question))[:, None, :])
