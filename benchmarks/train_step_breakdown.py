"""Where a training step's time goes: each method against llava, split into video encoding, the LLM's forward,
backward and the optimizer step, plus the operators that take the most time (torch.profiler).

The LMs are the demo's (Llama 128 × 4 layers) and ``benchmarks/method_costs.py``'s larger one (512 × 8); the
video is random features of the demo's shape (8 frames × 4 tokens × 25) or of method_costs' (8 frames × 16 × 64).
Batch 32 (demo) or 8, one thread, stage sft (LM and adapter train); every method uses the demo's settings, and
weight-space methods inject every L/4 layers as in method_costs.py (every layer of the demo's LM).

    python benchmarks/train_step_breakdown.py                        # both LMs, llava and vipe
    python benchmarks/train_step_breakdown.py --lms llama-128x4 --methods llava vipe linvt --top 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, LlamaConfig

from video2param import VideoAdapterConfig, wrap_model
from video2param.demo import method_options

SETUPS = {
    # name: (hidden, layers, heads, ffn, frames, tokens per frame, feature width, batch, prompt tokens)
    "llama-128x4": (128, 4, 4, 256, 8, 4, 25, 32, 16),
    "llama-512x8": (512, 8, 8, 1376, 8, 16, 64, 8, 16),
}


def build(setup: str, method: str):
    hidden, layers, heads, ffn, frames, tokens, width, batch, prompt = SETUPS[setup]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048)
    llm = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    options = {k: v for k, v in method_options(method, frames).items() if k != "num_frames"}
    if "inject_every" in options:  # as benchmarks/method_costs.py: weight-space methods inject every L/4 layers
        options["inject_every"] = max(layers // 4, 1)
    config = VideoAdapterConfig(method=method, vision_hidden_size=width, num_frames=frames, **options)
    vm = wrap_model(llm, config, stage="sft")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 500, (batch, prompt), generator=g)  # token methods put the video before the prompt
    feats = torch.randn(batch, frames, tokens, width, generator=g)
    return vm, ids, feats


def phases(vm, ids, feats, repeats: int) -> dict[str, float]:
    """Median seconds of encode (forward of the method alone), forward (whole loss), backward, optimizer step."""
    opt = torch.optim.AdamW([p for p in vm.parameters() if p.requires_grad], lr=1e-4)
    mask = torch.ones_like(ids)
    out: dict[str, list[float]] = {"encode": [], "forward": [], "backward": [], "optimizer": []}
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        vm.encode_video(feats)
        t1 = time.perf_counter()
        loss = vm(input_ids=ids, attention_mask=mask, videos=feats, labels=ids).loss
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        if i:  # the first step warms up allocations and lazily built state
            for k, v in zip(out, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                out[k].append(v)
    return {k: statistics.median(v) for k, v in out.items()}


def top_operators(vm, ids, feats, top: int) -> list[tuple[str, float, int]]:
    """(operator, share of the step's self CPU time, calls) for the ``top`` most expensive operators of one step."""
    opt = torch.optim.AdamW([p for p in vm.parameters() if p.requires_grad], lr=1e-4)
    mask = torch.ones_like(ids)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss = vm(input_ids=ids, attention_mask=mask, videos=feats, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [(e.key, e.self_cpu_time_total / total, e.count) for e in ranked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lms", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--methods", nargs="+", default=["llava", "vipe"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| LM | method | step ms | encode ms | forward ms (incl. encode) | backward ms | optimizer ms | "
          "trainable params | top operators (share of self CPU time, calls) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for setup in args.lms:
        for method in args.methods:
            vm, ids, feats = build(setup, method)
            t = phases(vm, ids, feats, args.repeats)
            ops = top_operators(vm, ids, feats, args.top)
            params = sum(p.numel() for p in vm.parameters() if p.requires_grad)
            step = t["forward"] + t["backward"] + t["optimizer"]
            ops_text = "; ".join(f"{name} {100 * share:.0f}% ×{calls}" for name, share, calls in ops)
            print(f"| {setup} | {method} | {1e3 * step:.1f} | {1e3 * t['encode']:.1f} | {1e3 * t['forward']:.1f} | "
                  f"{1e3 * t['backward']:.1f} | {1e3 * t['optimizer']:.1f} | {params / 1e6:.2f}M | {ops_text} |",
                  flush=True)


if __name__ == "__main__":
    main()
