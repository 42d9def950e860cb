"""PPLLaVA on MovingShapes beside llava, with the unguided ablation (S uniform) and both pooling modes.

Same data, LM, front end, standardisation, training loop and scoring as ``video2param demo``; what this adds is a
small dual encoder aligned to the demo's vision front end, because PPLLaVA's relevance map is only as good as that
alignment (a random text tower gives a random S):

* its text tower is a tiny CLIP text transformer that reads the word tokenizer's ids; its patch side is CLIP's
  post-layernorm + visual projection applied to the front end's (standardised) features, which is exactly how
  ``DualEncoder.derive_views`` makes the projected view at run time. (The tiny CLIP vision transformer is never
  run: the features come from the front end.)
* it is trained contrastively on the training split only: for each (video, question) pair, the relevance
  S = softmax over the video's T·P tokens of scale · cos(text, patch) should put its mass on the tokens of the
  object the question names (all objects for order and count questions) — the named object is read off the
  question and the answer (a colour names it; objects in a video have distinct colours) and found in the front
  end's raw features by its colour. InfoNCE over tokens: loss = −log Σ_targets S.
* it is cached under ``--output/aligner`` (keyed by its settings) and reused.

Then every variant trains from the same LM initialisation for the same steps, and the table reports accuracy per
question type, visual tokens, LLM FLOPs and TTFT as ratios to llava.

Usage::

    python benchmarks/ppllava_movingshapes.py --steps 1000 --threads 2 --output runs/ppllava
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from video2param import VideoAdapterConfig, wrap_model
from video2param.bench import measure_costs
from video2param.data import VideoQACollator, chance_accuracy, evaluate, make_splits, moving_shapes_tokenizer
from video2param.data.collate import format_prompt
from video2param.data.features import FeatureStandardizer, encode_dataset, standardize_items
from video2param.data.moving_shapes import PALETTE
from video2param.demo import build_small_llm, demo_data_config, demo_front_end, method_settings
from video2param.train import TrainConfig, train
from video2param.video.dual_encoder import DualEncoder


@dataclasses.dataclass(frozen=True)
class AlignerSettings:
    width: int = 64  # text tower width
    layers: int = 2
    heads: int = 4
    embed: int = 32  # joint space
    positions: int = 32  # text positions (questions are ~12 tokens)
    steps: int = 400
    batch: int = 64
    lr: float = 3e-3
    seed: int = 0

    def key(self, **data: Any) -> str:
        """Cache key: these settings and what the data depends on (front-end width, frames, split sizes, seed)."""
        text = json.dumps({**dataclasses.asdict(self), **data}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def question_text(tokenizer, question: str) -> str:
    """What the text tower reads at run time: the decoded question (VideoModel's prompt text)."""
    ids = tokenizer(format_prompt(question, None))["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def target_tokens(raw: torch.Tensor, question: str, answer: str, qtype: str, colors: tuple[str, ...]) -> torch.Tensor:
    """(T, P) bool: the tokens of the object the question names (its colour), or of every object if it names none.

    ``raw`` are the front end's unstandardised features: channel 0 is presence, 1:4 the object's mean RGB.
    """
    present = raw[..., 0] > 0.5
    words = question.replace("?", " ").split()
    named = [c for c in colors if c in words]
    if not named and qtype == "color" and any(w in words for w in ("square", "circle", "triangle", "cross",
                                                                   "diamond")):
        named = [answer]  # "what colour is the square?" names the square, whose colour is the answer
    if not named:
        return present
    rgb = torch.tensor(PALETTE[named[0]], dtype=torch.float32) / 255
    close = (raw[..., 1:4] - rgb).abs().amax(-1) < 0.08
    hit = present & close
    return hit if bool(hit.any()) else present


def build_aligner(tokenizer, feature_width: int, settings: AlignerSettings):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(settings.seed)
    heads = next(h for h in (5, 4, 3, 2, 1) if feature_width % h == 0)
    text = dict(vocab_size=len(tokenizer), hidden_size=settings.width, intermediate_size=2 * settings.width,
                num_hidden_layers=settings.layers, num_attention_heads=settings.heads,
                max_position_embeddings=settings.positions, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=feature_width, intermediate_size=2 * feature_width,
                  num_hidden_layers=1, num_attention_heads=heads)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=settings.embed)).eval()


def align(model, tokenizer, train_std, train_raw, test_std, test_raw, colors, settings: AlignerSettings, log=print):
    """Train the text tower, text projection, post-layernorm and visual projection contrastively (see module doc)."""
    dual = DualEncoder(model, text_tokenizer=tokenizer)
    trainable = [*dual.text_model.parameters(), *dual.text_projection.parameters(),
                 *dual.tower.post_layernorm.parameters(), *dual.visual_projection.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    opt = torch.optim.AdamW([*trainable, log_scale], lr=settings.lr, weight_decay=0.01)
    texts = [question_text(tokenizer, it.question) for it in train_std]
    targets = [target_tokens(r.video, it.question, it.answer, it.qtype, colors) for r, it in zip(train_raw, train_std)]
    g = torch.Generator().manual_seed(settings.seed)
    for step in range(settings.steps):
        idx = torch.randint(len(train_std), (settings.batch,), generator=g).tolist()
        feats = torch.stack([train_std[i].video for i in idx])  # (B, T, P, Dv)
        mask = torch.stack([targets[i] for i in idx]).flatten(1)  # (B, T·P)
        text = dual.encode_text([texts[i] for i in idx])
        patches = F.normalize(dual.project_patches(feats).float(), dim=-1).flatten(1, 2)
        logits = log_scale.exp().clamp(max=100) * torch.einsum("be,bne->bn", text, patches)
        log_s = logits.log_softmax(-1)
        loss = -(log_s.masked_fill(~mask, float("-inf")).logsumexp(-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == settings.steps - 1:
            log(f"  aligner step {step}: loss {loss.item():.3f}, scale {log_scale.exp().item():.1f}")
    with torch.no_grad():
        model.logit_scale.fill_(float(log_scale.clamp(max=math.log(100))))
    model.requires_grad_(False)
    return model, relevance_quality(DualEncoder(model, text_tokenizer=tokenizer), tokenizer, test_std, test_raw, colors)


@torch.no_grad()
def relevance_quality(dual, tokenizer, items, raw, colors) -> dict[str, float]:
    """Mean S mass on the named object's tokens, and how often argmax S lands on them (held-out split)."""
    mass, top = [], []
    for start in range(0, len(items), 100):
        chunk = items[start : start + 100]
        text = dual.encode_text([question_text(tokenizer, it.question) for it in chunk])
        views = dual.derive_views(torch.stack([it.video for it in chunk]), ["projected"])["projected"].flatten(1, 2)
        s = (dual.logit_scale * torch.einsum("be,bne->bn", text, views.float())).softmax(-1)
        for k, it in enumerate(chunk):
            target = target_tokens(raw[start + k].video, it.question, it.answer, it.qtype, colors).flatten()
            mass.append(float(s[k][target].sum()))
            top.append(float(target[s[k].argmax()]))
    return {"target_mass": sum(mass) / len(mass), "argmax_on_target": sum(top) / len(top),
            "uniform_target_mass": float(sum(target_tokens(r.video, it.question, it.answer, it.qtype, colors).float()
                                            .mean() for r, it in zip(raw, items)) / len(items))}


def load_or_align(out: Path, tokenizer, data, colors, settings: AlignerSettings, log, **key: Any):
    from transformers import CLIPModel

    width = data[0][0].video.shape[-1]
    directory = out / "aligner" / settings.key(feature_width=width, **key)
    if (directory / "config.json").is_file():
        log(f"aligned dual encoder: cached in {directory}")
        model = CLIPModel.from_pretrained(directory).eval()
        quality = json.loads((directory / "quality.json").read_text())
    else:
        log("aligning a small dual encoder to the front end (training split only) ...")
        t0 = time.perf_counter()
        model, quality = align(build_aligner(tokenizer, width, settings), tokenizer, *data, colors, settings, log)
        quality["seconds"] = time.perf_counter() - t0
        model.save_pretrained(directory)
        (directory / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
    log(f"  relevance on held-out questions: {json.dumps({k: round(v, 3) for k, v in quality.items()})}")
    return DualEncoder(model, text_tokenizer=tokenizer), quality


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=3000)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output-size", type=int, nargs=3, default=[4, 1, 1],
                        help="PPLLaVA's pooled (T', H', W') (default 4 1 1: 32x fewer tokens than llava at 8 frames)")
    parser.add_argument("--lr", type=float, default=None, help="peak lr of every variant (default: llava's)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default="runs/ppllava")
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
    data_cfg = demo_data_config(args.frames, args.seed)
    train_set, test_set = make_splits(data_cfg, args.train_size, args.test_size)
    tokenizer = moving_shapes_tokenizer(data_cfg)
    front_end = demo_front_end(data_cfg.frame_size)
    encoder = front_end.vision_encoder(chunk_size=1024, progress=False)
    train_raw = encode_dataset(train_set, encoder, progress=False)
    test_raw = encode_dataset(test_set, encoder, progress=False)
    train_feats, test_feats = list(train_raw), list(test_raw)
    standardize_items(FeatureStandardizer.fit([it.video for it in train_feats]), train_feats, test_feats)
    width = encoder.hidden_size
    print(f"MovingShapes: {len(train_feats)} train / {len(test_feats)} test, features {tuple(train_feats[0].video.shape)}")

    aligner_tok = moving_shapes_tokenizer(data_cfg)
    dual, quality = load_or_align(out, aligner_tok, (train_feats, train_raw, test_feats, test_raw), data_cfg.colors,
                                  AlignerSettings(), print, frames=args.frames, train_size=args.train_size,
                                  test_size=args.test_size, seed=args.seed)
    random_dual = DualEncoder(build_aligner(aligner_tok, width, AlignerSettings()), text_tokenizer=aligner_tok)
    make_llm = lambda: build_small_llm(len(tokenizer) + 1, args.seed)  # noqa: E731  (+1: the video token)
    rows: dict[str, dict[str, Any]] = {}
    for name in args.variants:
        spec = VARIANTS[name]
        lr = args.lr if args.lr is not None else method_settings("llava").lr
        options = dict(spec["options"])
        helpers: dict[str, Any] = {}
        if spec["method"] == "ppllava":
            options["output_size"] = list(args.output_size)
            helpers["text_encoder"] = random_dual if spec.get("random_text") else dual
        torch.manual_seed(args.seed)
        config = VideoAdapterConfig(method=spec["method"], vision_hidden_size=width, num_frames=args.frames,
                                    options=options)
        vm = wrap_model(make_llm(), config, tokenizer=tokenizer, stage="sft", **helpers)
        collate = VideoQACollator(tokenizer, vm.video_token, train=True)
        print(f"\n== {name}: {args.steps} steps, lr {lr:g}, options {options} ==")
        result = train(vm, train_feats, collate, TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr,
                                                             seed=args.seed, log_every=max(args.steps // 4, 1),
                                                             progress=False))
        acc = evaluate(vm, test_feats, batch_size=100)
        batch = VideoQACollator(tokenizer, vm.video_token, train=False)(test_feats[:1])
        cost = measure_costs(vm, batch["input_ids"], batch["attention_mask"], batch["videos"], repeats=20)
        rows[name] = {"accuracy": acc, "cost": cost, "train_s": result.seconds, "loss": result.final_loss()}
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
                                 **ratios, "train_s": row["train_s"], "final_loss": row["loss"]}
    table = "\n".join(lines)
    print("\n" + table)
    summary["table"] = table
    summary["seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ntotal {summary['seconds']:.0f}s; results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
