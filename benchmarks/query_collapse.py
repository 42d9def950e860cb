"""Do the learned queries of a trained demo run still differ? ViPE's perceptual queries and LinVT's TTA queries.

Loads the ``vipe`` and ``linvt`` adapters a ``video2param demo --method all`` run saved (with their trained LMs),
encodes held-out videos of that run's seed and prints, per method:

* ViPE: the mean cosine of each perceptual query (after the injection blocks) to the mean query, and the singular
  values of the (r × dim) query matrix relative to the largest, averaged over videos. Queries that are copies of
  one vector make the video-dependent part of every delta rank 1.
* LinVT: per scale, α and the mean L1 distance of a query's attention row A from the scale's mean row (0 = every
  output token attends alike; rows sum to 1, so 2 is the most), and the mean cosine of the queries to their mean
  after the TTA blocks.
* LinVT, per question type: the share of the frame tokens that hold an object (the rest are empty grid cells), the
  mean weight each scale's output tokens put on those tokens (tokens = weights @ frame tokens), and the mean
  significance score of object tokens minus that of empty ones.

    python benchmarks/query_collapse.py runs/demo_all --seed 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F


def _load(run: Path, method: str, tokenizer):
    from transformers import AutoModelForCausalLM

    from video2param import VideoModel

    llm = AutoModelForCausalLM.from_pretrained(run / method / "llm")
    return VideoModel.from_pretrained(llm, run / method / "adapter", tokenizer=tokenizer).eval()


def vipe_report(vm, features: torch.Tensor) -> str:
    with torch.no_grad():
        q = vm.method.perceptual_queries(features).float()
    cosine = F.cosine_similarity(q, q.mean(1, keepdim=True), dim=-1).mean().item()
    s = torch.linalg.svdvals(q)
    ratios = (s / s[:, :1]).mean(0)[:6].tolist()
    return (f"vipe: query cosine to the mean query {cosine:.4f}; singular values / largest "
            f"{', '.join(f'{r:.3f}' for r in ratios)}")


def linvt_report(vm, items, collate) -> str:
    from video2param.methods.blocks import sinusoid
    from video2param.methods.linvt import ordered_selection

    batch = collate(items)
    with torch.no_grad():
        cond = vm._conditioning(len(items), batch["input_ids"], batch["attention_mask"], None, None)
        out = vm.method.tokenize(batch["videos"], None, cond)
        lines = []
        question = vm.method.question_embeds(cond.prompt.embeds, cond.prompt.mask.bool())
        for s, (scale, agg, aggregator) in enumerate(zip(out.scales, out.aggregation, vm.method.aggregators)):
            alpha = vm.method.mix[s]
            prior = ordered_selection(scale.mask, scale.score, agg.shape[1])
            attention = (agg - (1 - alpha) * prior) / alpha.clamp_min(1e-6)
            spread = (attention - attention.mean(1, keepdim=True)).abs().sum(-1).mean().item()
            pooled = scale.gather(out.frame_tokens)
            visual = vm.method.token_proj(pooled) + sinusoid(scale.time, vm.method.options.hidden_dim).to(pooled.dtype)
            q = aggregator.transformed_queries(visual, scale, question)
            cosine = F.cosine_similarity(q, q.mean(1, keepdim=True), dim=-1).mean().item()
            lines.append(f"linvt scale {s}: alpha {alpha.item():.2f}; attention-row distance from the mean row "
                         f"{spread:.4f}; query cosine to the mean query {cosine:.4f}")
    return "\n".join(lines)


def linvt_focus_report(vm, items, raw_items, collate) -> str:
    """Per question type: how much of LinVT's weight lands on the tokens of objects (the front end's empty cells
    are all-zero raw features)."""
    lines = []
    for qtype in dict.fromkeys(item.qtype for item in items):
        picked = [(item, raw) for item, raw in zip(items, raw_items) if item.qtype == qtype]
        batch = collate([item for item, _ in picked])
        on_object = torch.stack([raw.video for _, raw in picked]).abs().sum(-1).gt(0).flatten(1).float()  # (B, T·P)
        with torch.no_grad():
            cond = vm._conditioning(len(picked), batch["input_ids"], batch["attention_mask"], None, None)
            out = vm.method.tokenize(batch["videos"], None, cond)
            mass = (out.weights() * on_object[:, None]).sum(-1)  # (B, N)
        per_scale = [part.mean().item() for part in mass.split(vm.method.options.scale_queries, dim=1)]
        scores = out.scores.flatten(1)
        contrast = ((scores * on_object).sum() / on_object.sum()
                    - (scores * (1 - on_object)).sum() / (1 - on_object).sum()).item()
        lines.append(f"linvt {qtype}: object share of the frame tokens {on_object.mean().item():.2f}; weight on them "
                     f"per scale {', '.join(f'{m:.2f}' for m in per_scale)}; score object - empty {contrast:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="output directory of `video2param demo --method all` (or one with vipe/linvt)")
    parser.add_argument("--seed", type=int, default=0, help="the run's --seed (its held-out videos)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--videos", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from video2param.data import VideoQACollator
    from video2param.demo import demo_data

    data = demo_data(args.frames, args.seed)
    tokenizer = data.tokenizer
    items = data.test_feats[: args.videos]
    run = Path(args.run)
    if (run / "vipe" / "adapter").is_dir():
        print(vipe_report(_load(run, "vipe", tokenizer), torch.stack([item.video for item in items])))
    if (run / "linvt" / "adapter").is_dir():
        vm = _load(run, "linvt", tokenizer)
        collate = VideoQACollator(tokenizer, vm.video_token, train=False)
        print(linvt_report(vm, items, collate))
        print(linvt_focus_report(vm, data.test_feats[: 10 * args.videos], data.test_raw[: 10 * args.videos], collate))


if __name__ == "__main__":
    main()
