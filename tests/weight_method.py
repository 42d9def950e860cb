"""A small weight-space method defined in the tests (checks that the weight path works for user methods)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from video2param import LowRank, VideoMethod, WeightContext, register_method


@dataclass
class PooledDeltaOptions:
    per_sample_B: bool = False


@register_method(overwrite=True)
class PooledDelta(VideoMethod):
    """Mean-pools the video, maps it to A (and optionally B) of every site. Non-zero at birth on purpose."""

    name = "pooled_delta_test"
    kind = "weights"
    Options = PooledDeltaOptions

    def __init__(self, config, llm):
        super().__init__(config, llm)
        r, dv = config.rank, config.vision_hidden_size
        self.to_A = nn.ModuleList(nn.Linear(dv, r * s.in_features) for s in llm.sites)
        self.B = nn.ParameterList(nn.Parameter(torch.randn(s.out_features, r) * 0.3) for s in llm.sites)
        self.to_B = nn.ModuleList(nn.Linear(dv, r * s.out_features) for s in llm.sites) if self.options.per_sample_B else None

    def encode(self, features, frame_mask=None, text=None):
        if frame_mask is None:
            pooled = features.mean(dim=(1, 2))
        else:
            w = frame_mask[:, :, None, None].to(features.dtype)
            pooled = (features * w).sum(dim=(1, 2)) / (w.sum(dim=(1, 2)) * features.shape[2])
        deltas = {}
        r = self.config.rank
        for i, (site, key) in enumerate(zip(self.llm_info.sites, self.llm_info.site_keys)):
            A = self.to_A[i](pooled).view(-1, r, site.in_features)
            if self.to_B is not None:
                B = self.to_B[i](pooled).view(-1, site.out_features, r)
            else:
                B = self.B[i][None]
            deltas[key] = LowRank(A, B, self.config.scale)
        return WeightContext(deltas)
