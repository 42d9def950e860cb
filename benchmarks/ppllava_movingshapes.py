"""PPLLaVA on MovingShapes beside llava, with the unguided ablation (S uniform) and both pooling modes.

Same data, LM, front end, standardisation, training loop and scoring as ``video2param demo``; what this adds is a
small dual encoder aligned to the demo's vision front end (``video2param.data.text_alignment``), because PPLLaVA's
relevance map is only as good as that alignment (a random text tower gives a random S):

Its text tower and patch projection are trained contrastively on the training split only, so that S spreads its
mass evenly over the tokens of the object the question names; the model is cached under ``--output/aligner`` and reused.
Variants: llava; ppllava with ``pool_mode`` sum and window_softmax; ``relevance="uniform"`` (unguided pooling with
the same windows, the ablation); ppllava with a random (unaligned) text tower.

Then every variant trains from the same LM initialisation for the same steps, each at its method's learning rate in
the demo unless ``--lr`` is given, and the table reports accuracy per question type, visual tokens, LLM FLOPs and
TTFT as ratios to llava.

Usage::

    python benchmarks/ppllava_movingshapes.py --steps 2400 --threads 2 --output runs/ppllava
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from video2param import VideoAdapterConfig, wrap_model
from video2param.bench import measure_costs
from video2param.data import VideoQACollator, chance_accuracy, evaluate, make_splits, moving_shapes_tokenizer
from video2param.data.front_end import COLOUR, PRESENCE
from video2param.data.text_alignment import AlignerSettings, build_aligner, load_or_align
from video2param.demo import build_small_llm, demo_data, demo_data_config, method_options, method_settings
from video2param.train import TrainConfig, train
from video2param.video.dual_encoder import DualEncoder

VARIANTS: dict[str, dict[str, Any]] = {
    "llava": {"method": "llava", "options": {}},
    "ppllava": {"method": "ppllava", "options": {"pool_mode": "sum"}},
    "ppllava-window_softmax": {"method": "ppllava", "options": {"pool_mode": "window_softmax"}},
    "ppllava-uniform": {"method": "ppllava", "options": {"relevance": "uniform"}},
    "ppllava-random-text": {"method": "ppllava", "options": {"pool_mode": "sum"}, "random_text": True},
}


def cost_table(frames: int, grid: int, seed: int = 0, repeats: int = 5) -> str:
    """Visual tokens, LLM FLOPs and TTFT of llava and ppllava (default windows (2, 3, 3)) at ``frames`` frames of a
    ``grid`` × ``grid`` patch grid, on the demo's LM; weights are random (costs do not depend on them)."""
    tokenizer = moving_shapes_tokenizer(demo_data_config())
    width = 32
    dual = DualEncoder(build_aligner(tokenizer, width, AlignerSettings()), text_tokenizer=tokenizer)
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(1, frames, grid * grid, width, generator=g)
    reports = {}
    for method in ("llava", "ppllava"):
        torch.manual_seed(seed)
        llm = build_small_llm(len(tokenizer) + 1, seed)
        llm.config.max_position_embeddings = max(llm.config.max_position_embeddings, frames * grid * grid + 64)
        helpers = {"text_encoder": dual} if method == "ppllava" else {}
        vm = wrap_model(llm, method=method, vision_hidden_size=width, num_frames=frames, tokenizer=tokenizer,
                        **helpers)
        item = dataclasses.replace(make_splits(demo_data_config(), 1, 1)[1][0], video=feats[0])
        enc = VideoQACollator(tokenizer, vm.video_token, train=False)([item])
        reports[method] = measure_costs(vm, enc["input_ids"], enc["attention_mask"], feats, repeats=repeats)
    base = reports["llava"]
    lines = [f"| frames × patches | method | visual tokens | LLM MFLOPs/answer | × llava | TTFT ms | × llava |",
             "|---|---|---|---|---|---|---|"]
    for method, r in reports.items():
        ratios = r.ratios(base)
        lines.append(f"| {frames} × {grid}² | {method} | {r.visual_tokens} | {r.llm_flops / 1e6:.1f} | "
                     f"{ratios['flops_ratio']:.3f} | {1e3 * r.ttft_s:.1f} | {ratios['ttft_ratio']:.2f} |")
    return "\n".join(lines)


GAP_BUCKETS = ((2, "2"), (4, "3-4"), (8, "5-8"), (10**9, "9+"))


def appearance_gap(raw_video: torch.Tensor) -> int:
    """Frames between the first two objects' appearances, from unstandardised front-end features (T, P, D): an
    object is a colour (objects of one video differ in colour) in a cell whose presence is set. -1 for a video with
    fewer than two objects."""
    frame, cell = (raw_video[..., PRESENCE] > 0.5).nonzero(as_tuple=True)
    if frame.numel() == 0:
        return -1
    colours = (raw_video[frame, cell][:, COLOUR] * 100).round()
    _, which = torch.unique(colours, dim=0, return_inverse=True)
    first = torch.full((int(which.max()) + 1,), raw_video.shape[0]).scatter_reduce(0, which, frame, "amin")
    firsts = first.sort().values.tolist()
    return firsts[1] - firsts[0] if len(firsts) >= 2 else -1


def order_accuracy_by_gap(vm, feats: list, raws: list, per_bucket: int | None = None) -> dict[str, tuple[int, float]]:
    """Accuracy on the ``order`` questions grouped by the gap between the objects' appearances: {bucket: (questions,
    accuracy %)}; at most ``per_bucket`` questions each."""
    buckets: dict[str, list] = {}
    for item, raw in zip(feats, raws):
        if item.qtype == "order":
            gap = appearance_gap(raw.video)
            if gap < 0:
                continue
            label = next(name for top, name in GAP_BUCKETS if gap <= top)
            buckets.setdefault(label, []).append(item)
    report = {}
    for _, label in GAP_BUCKETS:
        items = buckets.get(label, [])[:per_bucket]
        if items:
            report[label] = (len(items), round(100 * evaluate(vm, items, batch_size=100)["overall"], 1))
    return report


def pooling_layout(output_size: list[int] | None, frames: int) -> dict[str, Any]:
    """PPLLaVA's pooling sizes: ``output_size`` alone when given, else the demo's layout at ``frames``."""
    if output_size is not None:
        return {"output_size": list(output_size)}
    demo = method_options("ppllava", frames).get("options", {})
    return {key: demo[key] for key in ("output_size", "extra_output_sizes") if key in demo}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=3000)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output-size", type=int, nargs=3, default=None,
                        help="PPLLaVA's pooled (T', H', W'), alone (plus what --options adds); default: the demo's "
                             "layout for --frames (3 1 1 at 8 frames; 2 2 2 and 6 1 1 from 32)")
    parser.add_argument("--options", type=json.loads, default={},
                        help="PPLLaVA options (JSON) added to every ppllava variant's, e.g. '{\"temperature\": 0.1}'")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of every variant")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak lr of every variant (default: each method's in the demo)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default="runs/ppllava")
    parser.add_argument("--order-by-gap", action="store_true",
                        help="also report order accuracy by the frames between the objects' appearances, on the "
                             "held-out questions and on up to 150 training questions per gap")
    parser.add_argument("--costs", type=int, nargs=2, metavar=("FRAMES", "GRID"), default=None,
                        help="only measure costs of llava and ppllava at FRAMES frames of GRID x GRID patches")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.costs:
        print(cost_table(*args.costs))
        return
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = demo_data(args.frames, args.seed, args.train_size, args.test_size)
    data_cfg, tokenizer, encoder = data.config, data.tokenizer, data.encoder
    train_feats, test_feats, train_raw, test_raw = data.train_feats, data.test_feats, data.train_raw, data.test_raw
    width = encoder.hidden_size
    print(f"MovingShapes: {len(train_feats)} train / {len(test_feats)} test, "
          f"features {tuple(train_feats[0].video.shape)}")

    aligner_tok = moving_shapes_tokenizer(data_cfg)
    dual, quality = load_or_align(out / "aligner", aligner_tok, (train_feats, train_raw), (test_feats, test_raw),
                                  data_cfg.colors, AlignerSettings(), print, frames=args.frames,
                                  train_size=args.train_size, test_size=args.test_size, seed=args.seed)
    print(f"  relevance on held-out questions: {json.dumps({k: round(v, 3) for k, v in quality.items()})}")
    random_dual = DualEncoder(build_aligner(aligner_tok, width, AlignerSettings()), text_tokenizer=aligner_tok)
    vocab_size = len(tokenizer) + 1  # +1: the video token; fixed before wrap_model adds it to the tokenizer
    make_llm = lambda: build_small_llm(vocab_size, args.seed)  # noqa: E731  (every variant: the same initial LM)
    rows: dict[str, dict[str, Any]] = {}
    for name in args.variants:
        spec = VARIANTS[name]
        lr = args.lr if args.lr is not None else method_settings(spec["method"], args.frames).lr
        options = dict(spec["options"])
        helpers: dict[str, Any] = {}
        if spec["method"] == "ppllava":
            options.update(pooling_layout(args.output_size, args.frames))
            options.update(args.options)
            helpers["text_encoder"] = random_dual if spec.get("random_text") else dual
        torch.manual_seed(args.seed)
        config = VideoAdapterConfig(method=spec["method"], vision_hidden_size=width, num_frames=args.frames,
                                    options=options)
        vm = wrap_model(make_llm(), config, tokenizer=tokenizer, stage="sft", **helpers)
        collate = VideoQACollator(tokenizer, vm.video_token, train=True)
        print(f"\n== {name}: {args.steps} steps, lr {lr:g}, options {options} ==")
        recipe = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, weight_decay=args.weight_decay,
                             seed=args.seed, log_every=max(args.steps // 4, 1), progress=False)
        result = train(vm, train_feats, collate, recipe)
        acc = evaluate(vm, test_feats, batch_size=100)
        batch = VideoQACollator(tokenizer, vm.video_token, train=False)(test_feats[:1])
        cost = measure_costs(vm, batch["input_ids"], batch["attention_mask"], batch["videos"], repeats=20)
        rows[name] = {"accuracy": acc, "cost": cost, "train_s": result.seconds, "loss": result.final_loss()}
        if args.order_by_gap:
            by_gap = {"held_out": order_accuracy_by_gap(vm, test_feats, test_raw),
                      "train": order_accuracy_by_gap(vm, train_feats, train_raw, per_bucket=150)}
            rows[name]["order_by_gap"] = by_gap
            print(f"  order accuracy by appearance gap (questions, %): {json.dumps(by_gap)}")
        print(f"  {json.dumps({k: round(100 * v, 1) for k, v in acc.items()})}; {result.seconds:.0f}s")
    base = rows.get("llava")
    qtypes = [k for k in next(iter(rows.values()))["accuracy"] if k != "overall"] + ["overall"]
    chance = chance_accuracy(data_cfg)
    lines = ["| variant | " + " | ".join(qtypes) + " | visual tokens | LLM FLOPs (× llava) | TTFT (× llava) |",
             "|" + "---|" * (len(qtypes) + 4),
             "| chance | " + " | ".join(f"{100 * chance[k]:.1f}" if k in chance else "" for k in qtypes) + " | | | |"]
    summary = {"args": vars(args), "aligner": quality, "rows": {}}
    for name, row in rows.items():
        ratios = row["cost"].ratios(base["cost"]) if base else {"flops_ratio": float("nan"), "ttft_ratio": float("nan")}
        lines.append(f"| {name} | " + " | ".join(f"{100 * row['accuracy'][k]:.1f}" for k in qtypes)
                     + f" | {row['cost'].visual_tokens} | {ratios['flops_ratio']:.3f} | {ratios['ttft_ratio']:.2f} |")
        summary["rows"][name] = {"accuracy": row["accuracy"], "visual_tokens": row["cost"].visual_tokens,
                                 **ratios, "train_s": row["train_s"], "final_loss": row["loss"],
                                 **({"order_by_gap": row["order_by_gap"]} if "order_by_gap" in row else {})}
    table = "\n".join(lines)
    print("\n" + table)
    summary["table"] = table
    summary["seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ntotal {summary['seconds']:.0f}s; results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
