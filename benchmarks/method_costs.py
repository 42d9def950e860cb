"""Cost of answering a question about an already-encoded video: ViPE against the llava baseline, same run.

For each LM size and frame count, measures per answer: visual tokens fed to the LLM, LLM FLOPs
(torch.utils.flop_counter, the low-rank deltas included), time to first token (median of repeats), and one
training step (forward + backward + AdamW) — all as ratios vipe / llava.

    python benchmarks/method_costs.py                # CPU, small LMs, prints a markdown table
    python benchmarks/method_costs.py --device cuda  # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from video2param import VideoAdapterConfig, wrap_model
from video2param.bench import measure_costs

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
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    rows = []
    for lm_name in args.lms:
        hidden, layers, heads, ffn = LMS[lm_name]
        for frames in args.frames:
            results = {}
            for method in ("llava", "vipe"):
                torch.manual_seed(0)
                opts = {"hidden_dim": 128, "num_heads": 4, "depth": 2} if method == "vipe" else {}
                cfg = VideoAdapterConfig(method=method, vision_hidden_size=args.dv, num_frames=frames, rank=16,
                                         alpha=32, inject_every=max(layers // 4, 1), options=opts)
                vm = wrap_model(build_lm(hidden, layers, heads, ffn, args.device), cfg, stage="sft").to(args.device)
                ids = torch.randint(4, 500, (1, args.prompt_tokens), device=args.device)
                feats = torch.randn(1, frames, args.patches, args.dv, device=args.device)
                cost = measure_costs(vm, ids, torch.ones_like(ids), feats, repeats=args.repeats)
                tb = args.train_batch
                step = train_step_time(vm, ids.repeat(tb, 1), feats.repeat(tb, 1, 1, 1), max(args.repeats // 2, 3))
                results[method] = (cost, step)
            base, base_step = results["llava"]
            vipe, vipe_step = results["vipe"]
            rows.append((lm_name, frames, base.visual_tokens, vipe.visual_tokens, vipe.llm_flops / base.llm_flops,
                         vipe.ttft_s / base.ttft_s, vipe_step / base_step, base.llm_flops, base.ttft_s))
    print(f"device: {args.device}; prompt {args.prompt_tokens} tokens, {args.patches} visual tokens per frame, "
          f"ViPE rank 16, injection every L/4 layers, train batch {args.train_batch}\n")
    print("| LM | frames | llava visual tokens | vipe visual tokens | FLOPs/answer (vipe ÷ llava) | "
          "TTFT (vipe ÷ llava) | train step (vipe ÷ llava) | llava GFLOPs/answer | llava TTFT ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.3f} | {r[5]:.2f} | {r[6]:.2f} | {r[7] / 1e9:.3f} | "
              f"{1e3 * r[8]:.1f} |")


if __name__ == "__main__":
    main()
