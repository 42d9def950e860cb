"""Cost measurements of a VideoModel with the video already encoded: visual tokens, LLM FLOPs, time to first
token, peak memory. Report them as ratios against the llava baseline measured in the same run."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .methods.base import TokenContext, VideoContext


@dataclass
class CostReport:
    visual_tokens: int  # per video, fed to the LLM
    llm_flops: float  # one forward over prompt (+ video tokens), per answer
    ttft_s: float  # median time to first token, video encoded beforehand
    peak_memory_bytes: int | None = None  # CUDA only

    def ratios(self, baseline: "CostReport") -> dict[str, float]:
        return {
            "flops_ratio": self.llm_flops / baseline.llm_flops,
            "ttft_ratio": self.ttft_s / baseline.ttft_s,
        }


def visual_tokens(context: VideoContext) -> int:
    """Visual tokens per video that the LLM reads (0 for weight-space methods)."""
    return context.num_tokens if isinstance(context, TokenContext) else 0


@torch.no_grad()
def llm_flops(vm, input_ids: torch.Tensor, attention_mask: torch.Tensor, context: VideoContext) -> float:
    """FLOPs of one LLM forward per prompt, counted by torch.utils.flop_counter (the deltas included)."""
    counter = FlopCounterMode(display=False)
    with counter:
        vm(input_ids=input_ids, attention_mask=attention_mask, context=context)
    return counter.get_total_flops() / input_ids.shape[0]


@torch.no_grad()
def time_to_first_token(vm, input_ids: torch.Tensor, attention_mask: torch.Tensor, context: VideoContext,
                        repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of ``generate(max_new_tokens=1)`` with a ready context."""
    def once() -> float:
        if input_ids.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        vm.generate(input_ids=input_ids, attention_mask=attention_mask, context=context, max_new_tokens=1,
                    do_sample=False)
        if input_ids.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(warmup):
        once()
    return statistics.median(once() for _ in range(repeats))


def measure_costs(vm, input_ids: torch.Tensor, attention_mask: torch.Tensor, videos, frame_mask=None,
                  repeats: int = 10) -> CostReport:
    """All cost figures for one batch of prompts and videos."""
    was_training = vm.training
    vm.eval()
    try:
        context = vm.encode_video(videos, frame_mask, input_ids=input_ids, attention_mask=attention_mask)
        if input_ids.is_cuda:
            torch.cuda.reset_peak_memory_stats()
        return CostReport(
            visual_tokens=visual_tokens(context),
            llm_flops=llm_flops(vm, input_ids, attention_mask, context),
            ttft_s=time_to_first_token(vm, input_ids, attention_mask, context, repeats=repeats),
            peak_memory_bytes=torch.cuda.max_memory_allocated() if input_ids.is_cuda else None,
        )
    finally:
        vm.train(was_training)
