"""Cost of answering a question about an already-encoded video: each method against the llava baseline, same run.

For each LM size and frame count, measures per answer: visual tokens fed to the LLM, LLM FLOPs
(torch.utils.flop_counter with attention and the low-rank deltas included, see video2param.bench), time to first
token (median of repeats), and one training step (forward + backward + AdamW) — all as ratios method / llava.
The time ratios are what the demo's ~1M-parameter LM cannot show: there a forward pass is mostly fixed per-call
overhead, here the LMs are large enough for the work to dominate.

    python benchmarks/method_costs.py                  # CPU, every registered method, prints a markdown table
    python benchmarks/method_costs.py --methods vipe   # one method
    python benchmarks/method_costs.py --device cuda    # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from video2param import VideoAdapterConfig, wrap_model
from video2param.bench import measure_costs
from video2param.demo import BASELINE, method_settings
from video2param.methods.base import available_methods

LMS = {
    # name: (hidden, layers, heads, ffn)
    "llama-128x4": (128, 4, 4, 256),
    "llama-512x8": (512, 8, 8, 1376),
}


def build_lm(hidden, layers, heads, ffn, device):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(device).eval()


def train_step_time(vm, ids, feats, repeats: int) -> float:
    opt = torch.optim.AdamW([p for p in vm.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = vm(input_ids=ids, attention_mask=torch.ones_like(ids), videos=feats, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ids.is_cuda:
            torch.cuda.synchronize()

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--patches", type=int, default=16, help="Visual tokens per frame (16 = 4x4 grid).")
    parser.add_argument("--dv", type=int, default=64, help="Vision feature width.")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--lms", nargs="+", default=list(LMS))
    parser.add_argument("--methods", nargs="+", default=None,
                        help="Methods to compare with llava (default: every registered method).")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    methods = [BASELINE] + [m for m in (args.methods or available_methods()) if m != BASELINE]

    rows = []
    for lm_name in args.lms:
        hidden, layers, heads, ffn = LMS[lm_name]
        for frames in args.frames:
            results = {}
            for method in methods:
                torch.manual_seed(0)
                # The demo's (8-frame) settings for the method at every length, so that only the length changes;
                # weight-space methods inject every L/4 layers (ViPE's choice).
                adapter = dict(method_settings(method).adapter)
                if "inject_every" in adapter:
                    adapter["inject_every"] = max(layers // 4, 1)
                cfg = VideoAdapterConfig(method=method, vision_hidden_size=args.dv, num_frames=frames, **adapter)
                try:
                    vm = wrap_model(build_lm(hidden, layers, heads, ffn, args.device), cfg, stage="sft")
                    vm = vm.to(args.device)
                    ids = torch.randint(4, 500, (1, args.prompt_tokens), device=args.device)
                    feats = torch.randn(1, frames, args.patches, args.dv, device=args.device)
                    cost = measure_costs(vm, ids, torch.ones_like(ids), feats, repeats=args.repeats)
                    tb = args.train_batch
                    step = train_step_time(vm, ids.repeat(tb, 1), feats.repeat(tb, 1, 1, 1),
                                           max(args.repeats // 2, 3))
                except Exception as err:  # noqa: BLE001 - a method that cannot run here is reported, not fatal
                    if method == BASELINE:
                        raise
                    print(f"{method} on {lm_name} ({frames} frames) failed: {type(err).__name__}: {err}")
                    continue
                results[method] = (cost, step)
            base, base_step = results[BASELINE]
            for method, (cost, step) in results.items():
                if method != BASELINE:
                    rows.append((lm_name, frames, method, base.visual_tokens, cost.visual_tokens,
                                 cost.llm_flops / base.llm_flops, cost.ttft_s / base.ttft_s, step / base_step,
                                 base.llm_flops, base.ttft_s))
    print(f"device: {args.device}; prompt {args.prompt_tokens} tokens, {args.patches} visual tokens per frame, "
          f"train batch {args.train_batch}; FLOPs with attention\n")
    print("| LM | frames | method | llava visual tokens | method visual tokens | FLOPs/answer (÷ llava) | "
          "TTFT (÷ llava) | train step (÷ llava) | llava GFLOPs/answer | llava TTFT ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.3f} | {r[6]:.2f} | {r[7]:.2f} | "
              f"{r[8] / 1e9:.3f} | {1e3 * r[9]:.1f} |")


if __name__ == "__main__":
    main()
