"""`video2param demo`: train a method and the llava baseline on MovingShapes on the CPU and compare them.

Everything is built from configs (a small Llama-style LM, a small CLIP vision tower, a word tokenizer), so the
demo needs no network. Users who have real checkpoints pass ``--llm`` / ``--vision`` names or paths.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .bench import CostReport, measure_costs
from .config import VideoAdapterConfig
from .data import MovingShapesConfig, VideoQACollator, evaluate, make_splits, moving_shapes_tokenizer
from .model import VideoModel, wrap_model
from .train import TrainConfig, train

BASELINE = "llava"


@dataclass
class DemoConfig:
    method: str = field(default="vipe", metadata={"help": "Method to compare with the llava baseline."})
    steps: int = field(default=600, metadata={"help": "Training steps per method."})
    frames: int = field(default=8, metadata={"help": "Frames per MovingShapes video."})
    seed: int = field(default=0, metadata={"help": "Seed of data, models and training."})
    output_dir: str = field(default="runs/demo", metadata={"help": "Where adapters and results.json go."})
    train_size: int = field(default=3000, metadata={"help": "Training questions."})
    test_size: int = field(default=500, metadata={"help": "Held-out questions."})
    batch_size: int = field(default=32, metadata={"help": "Batch size."})
    lr: float | None = field(default=None, metadata={"help": "Peak learning rate (default: per method, see METHOD_LR)."})
    llm: str | None = field(default=None, metadata={"help": "HF causal LM name or path (default: a small Llama from config)."})
    vision: str | None = field(default=None, metadata={"help": "HF vision tower name or path (default: a small CLIP from config)."})
    stage: str = field(default="sft", metadata={"help": "What trains: sft = adapter + LLM, pretrain = adapter only."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})


# Peak learning rates that train each method stably from a random LM (measured on MovingShapes; ViPE's
# shared W_l grows too fast at the token path's rate and drowns the LM's small initial projections).
METHOD_LR = {"llava": 2e-3, "vipe": 5e-4}


def build_small_llm(vocab_size: int, seed: int):
    """A ~1M-parameter Llama-style LM built from its config (random weights)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def build_small_vision(image_size: int, seed: int):
    """A small CLIP vision tower built from its config (random, frozen): 8-pixel patches, width 64."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(image_size=image_size, patch_size=8, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4)
    return CLIPVisionModel(config).eval()


def method_options(method: str, frames: int) -> dict[str, Any]:
    """Sizes for the demo's small models (the library defaults are the papers', for 7B LMs)."""
    common: dict[str, Any] = {"num_frames": frames}
    if method == "vipe":
        return common | {"rank": 16, "alpha": 32.0, "inject_every": 1,
                         "options": {"hidden_dim": 128, "num_heads": 4, "depth": 2}}
    return common


def encode_dataset(dataset, encoder, batch: int = 128) -> list:
    """Encode every video once with the frozen tower; the items keep their questions, videos become features."""
    items = [dataset[i] for i in range(len(dataset))]
    out = []
    with torch.inference_mode():
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            frames = torch.cat([it.video for it in chunk])  # (sum T, 3, H, W)
            feats = encoder.encode_frames(frames)
            sizes = [it.video.shape[0] for it in chunk]
            for it, f in zip(chunk, feats.split(sizes)):
                out.append(dataclasses.replace(it, video=f.clone()))
    return out


def standardize(train_items: list, *others: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise features per channel with training-set statistics, in place; returns (mean, std).

    A random (or real) vision tower puts large constant offsets on some channels (|mean| ≈ 10× the spread here);
    removing them lets both methods see the small differences that carry colour and position.
    """
    flat = torch.cat([it.video.flatten(0, -2) for it in train_items])
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
    for items in (train_items, *others):
        for i, it in enumerate(items):
            items[i] = dataclasses.replace(it, video=(it.video - mean) / std)
    return mean, std


def run_demo(cfg: DemoConfig, log=print) -> dict[str, Any]:
    from .video.encoder import VisionEncoder

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    data_cfg = MovingShapesConfig(num_frames=cfg.frames, seed=cfg.seed)
    train_set, test_set = make_splits(data_cfg, cfg.train_size, cfg.test_size)
    if cfg.llm:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.llm)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        make_llm = lambda: AutoModelForCausalLM.from_pretrained(cfg.llm)  # noqa: E731
    else:
        tokenizer = moving_shapes_tokenizer(data_cfg)
        make_llm = lambda: build_small_llm(len(tokenizer) + 1, cfg.seed)  # noqa: E731  (+1: the video token)
    tower = (VisionEncoder.from_pretrained(cfg.vision, chunk_size=256, progress=False) if cfg.vision
             else VisionEncoder(build_small_vision(data_cfg.frame_size, cfg.seed), chunk_size=256, progress=False))
    log(f"MovingShapes: {len(train_set)} train / {len(test_set)} test questions, {cfg.frames} frames of "
        f"{data_cfg.frame_size}px; encoding them once with the frozen vision tower ...")
    train_feats = encode_dataset(train_set, tower)
    test_feats = encode_dataset(test_set, tower)
    standardize(train_feats, test_feats)
    log(f"  features {tuple(train_feats[0].video.shape)} per video ({time.perf_counter() - t0:.1f}s)")

    methods = [cfg.method] + ([BASELINE] if cfg.method != BASELINE else [])
    rows: dict[str, dict[str, Any]] = {}
    costs: dict[str, CostReport] = {}
    for name in methods:
        log(f"\n== {name}: training {cfg.steps} steps (stage {cfg.stage}) ==")
        torch.manual_seed(cfg.seed)
        opts = method_options(name, cfg.frames)
        config = VideoAdapterConfig(method=name, vision_hidden_size=tower.hidden_size, **opts)
        vm = wrap_model(make_llm(), config, tokenizer=tokenizer, stage=cfg.stage)
        collate = VideoQACollator(tokenizer, vm.video_token, train=True)
        lr = cfg.lr if cfg.lr is not None else METHOD_LR.get(name, 1e-3)
        result = train(vm, train_feats, collate, TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=lr,
                                                             seed=cfg.seed, log_every=max(cfg.steps // 4, 1)), log=log)
        acc = evaluate(vm, test_feats, batch_size=64)
        costs[name] = _costs(vm, tokenizer, test_feats)
        rows[name] = {"accuracy": acc, "train_step_s": result.step_time, "final_loss": sum(result.losses[-20:]) / 20}
        out_dir = Path(cfg.output_dir) / name
        vm.save_pretrained(out_dir, metrics={k: v for k, v in acc.items()})
        log(f"  accuracy {json.dumps({k: round(v, 3) for k, v in acc.items()})}; adapter saved to {out_dir}")
    base = costs[BASELINE]
    for name in methods:
        c = costs[name]
        rows[name].update({"visual_tokens": c.visual_tokens, "llm_flops": c.llm_flops, "ttft_s": c.ttft_s,
                           **c.ratios(base),
                           "train_step_ratio": rows[name]["train_step_s"] / rows[BASELINE]["train_step_s"]})
    table = format_table(rows, methods)
    log("\n" + table)
    summary = {"config": dataclasses.asdict(cfg), "rows": rows, "table": table,
               "seconds": time.perf_counter() - t0}
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output_dir) / "results.json").write_text(json.dumps(summary, indent=2))
    log(f"\ntotal {summary['seconds']:.0f}s; results in {cfg.output_dir}/results.json")
    return summary


def _costs(vm: VideoModel, tokenizer, items) -> CostReport:
    collate = VideoQACollator(tokenizer, vm.video_token, train=False)
    batch = collate(items[:1])
    return measure_costs(vm, batch["input_ids"], batch["attention_mask"], batch["videos"], repeats=20)


def format_table(rows: dict[str, dict[str, Any]], methods: list[str]) -> str:
    """The demo's markdown table: accuracy per question type, visual tokens, FLOPs and TTFT ratios."""
    qtypes = [k for k in next(iter(rows.values()))["accuracy"] if k not in ("overall",)]
    head = ["method", *qtypes, "overall", "visual tokens", "LLM FLOPs/answer (× llava)", "TTFT (× llava)",
            "train step (× llava)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in methods:
        r = rows[name]
        acc = r["accuracy"]
        cells = [name, *[f"{100 * acc[q]:.1f}" for q in qtypes], f"{100 * acc['overall']:.1f}", str(r["visual_tokens"]),
                 f"{r['flops_ratio']:.3f}", f"{r['ttft_ratio']:.2f}", f"{r['train_step_ratio']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
