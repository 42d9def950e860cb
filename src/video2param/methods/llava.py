"""LLaVA-style baseline: every frame's patch tokens, projected into the LLM's embedding space.

features (B, T, P, Dv) → optional spatial average pooling over the patch grid → + learned temporal position
embedding (one vector per frame index) → 2-layer MLP projector (Dv → D → D) → T·P' input tokens.
It is the yardstick the other methods are measured against: quality, visual tokens, FLOPs, latency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .base import Conditioning, LLMInfo, TokenContext, VideoMethod, register_method


@dataclass
class LlavaOptions:
    spatial_pool: int = field(
        default=1,
        metadata={"help": "Average-pool the square patch grid by this stride before projecting (1 = keep every patch).",
                  "min": 1, "max": 64},
    )
    temporal_embedding: bool = field(
        default=True, metadata={"help": "Add a learned per-frame position embedding so the order of frames is visible."}
    )


@register_method
class LlavaMethod(VideoMethod):
    """Token baseline: T·P' projected frame tokens per video."""

    name = "llava"
    kind = "tokens"
    Options = LlavaOptions

    def __init__(self, config, llm: LLMInfo) -> None:
        super().__init__(config, llm)
        dv = self.vision_width
        d = llm.hidden_size
        self.temporal = nn.Embedding(config.num_frames, dv) if self.options.temporal_embedding else None
        if self.temporal is not None:
            nn.init.normal_(self.temporal.weight, std=0.02)
        self.projector = nn.Sequential(nn.Linear(dv, d), nn.GELU(), nn.Linear(d, d))

    def encode(self, features: torch.Tensor, frame_mask: torch.Tensor | None = None,
               cond: Conditioning | None = None) -> TokenContext:
        b, t, p, dv = features.shape
        if t > self.config.num_frames and self.temporal is not None:
            raise ValueError(
                f"videos: {t} frames but the adapter was built for at most num_frames={self.config.num_frames}"
            )
        x = features
        if self.options.spatial_pool > 1:
            x = _pool_patch_grid(x, self.options.spatial_pool)
        if self.temporal is not None:
            x = x + self.temporal.weight[:t].to(x.dtype)[None, :, None, :]
        tokens = self.projector(x.to(self.projector[0].weight.dtype))  # (B, T, P', D)
        p_out = tokens.shape[2]
        embeds = tokens.reshape(b, t * p_out, -1)
        mask = None
        if frame_mask is not None:
            mask = frame_mask[:, :, None].expand(b, t, p_out).reshape(b, t * p_out)
        return TokenContext(embeds, mask)


def _pool_patch_grid(features: torch.Tensor, stride: int) -> torch.Tensor:
    """Average-pool (B, T, P, Dv) over its square patch grid; P must be a perfect square."""
    b, t, p, dv = features.shape
    side = math.isqrt(p)
    if side * side != p:
        raise ValueError(f"options.spatial_pool: needs a square patch grid, got {p} patches per frame")
    if side < stride:
        raise ValueError(f"options.spatial_pool: stride {stride} exceeds the {side}x{side} patch grid")
    grid = features.reshape(b * t, side, side, dv).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grid, kernel_size=stride, stride=stride)
    return pooled.permute(0, 2, 3, 1).reshape(b, t, -1, dv)
