"""Cost measurements of a VideoModel with the video already encoded: visual tokens, LLM FLOPs, time to first
token, peak memory. Report them as ratios against the llava baseline measured in the same run.

FLOPs are counted by ``torch.utils.flop_counter`` with attention included: its registry knows the CUDA attention
kernels but not the one scaled-dot-product attention runs on the CPU (``_scaled_dot_product_flash_attention_for_cpu``),
so without :data:`ATTENTION_FLOPS` a CPU count silently leaves attention out (and with it the part of a token
method's cost that grows quadratically with the number of visual tokens).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .methods.base import TokenContext, VideoContext


def attention_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args,
                    **kwargs) -> int:
    """FLOPs of ``softmax(q kᵀ) v`` for (B, H, Lq, d) queries: 2·B·H·Lq·Lk·(d_qk + d_v), as eager attention counts.

    The full Lq × Lk score matrix is counted (a causal mask does not skip work in these kernels); grouped-query
    keys and values (fewer heads than the queries) are counted per query head, which is what the kernel computes.
    """
    batch, heads, q_len, qk_dim = query_shape
    k_len, v_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * q_len * k_len * (qk_dim + v_dim)


#: Extra FlopCounterMode formulas: attention ops its registry lacks (the CPU kernel of SDPA).
ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops}


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
    """FLOPs of one LLM forward per prompt, counted by torch.utils.flop_counter (the deltas and attention included)."""
    counter = FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS)
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
