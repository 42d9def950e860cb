"""Video2LoRA on MovingShapes: the student (no visual tokens) against its teacher (llava, video in context).

1. MovingShapes with every question type about 1–2 objects (``MovingShapesConfig`` defaults), the demo's
   object-grid front end (``--grid`` × ``--grid`` tokens per frame) and small LM: a llava teacher is trained (stage
   sft, the demo's llava recipe) and saved under ``--out`` (reused by later runs with the same settings).
2. A Video2LoRA student on the teacher's LM (frozen) distils from it: only the hypernetwork trains.
3. Long videos: MovingShapes videos ``--long-factor`` × the training length whose objects appear a segment apart
   (so they lie in different segments, and order questions compare segments). The student composes one LoRA per
   segment; it is scored without chunk training, then after a chunk-training stage on videos of 1..k segments.

    python benchmarks/video2lora_moving_shapes.py --out runs/video2lora

Prints a markdown table of accuracy per question type and writes ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from video2param import VideoAdapterConfig, VideoModel, wrap_model
from video2param.data import MovingShapesConfig, VideoQACollator, chance_accuracy, evaluate, make_splits
from video2param.data import moving_shapes_tokenizer
from video2param.data.features import FeatureStandardizer, encode_dataset, standardize_items
from video2param.data.front_end import ObjectGridConfig, ObjectGridFrontEnd
from video2param.demo import build_small_llm, method_settings
from video2param.distill import DistillConfig, distill, teacher_answers, with_answers
from video2param.train import TrainConfig, train


def features_of(cfg: MovingShapesConfig, train_size: int, test_size: int, encoder, standardizer=None):
    train_set, test_set = make_splits(cfg, train_size, test_size)
    train_feats = encode_dataset(train_set, encoder, progress=False) if train_size else []
    test_feats = encode_dataset(test_set, encoder, progress=False)
    if standardizer is None:
        standardizer = FeatureStandardizer.fit([item.video for item in train_feats])
    standardize_items(standardizer, train_feats, test_feats)
    return train_feats, test_feats, standardizer


def long_config(base: MovingShapesConfig, segments: int) -> MovingShapesConfig:
    """``segments`` × the training length; with 2+ segments objects appear a whole segment apart."""
    if segments == 1:
        return base
    return dataclasses.replace(base, num_frames=base.num_frames * segments, order_gap=base.num_frames)


def teacher_model(args, tokenizer, vision_width, train_feats, log) -> tuple[VideoModel, dict]:
    """The llava teacher: loaded from ``--out``/teacher when a run with the same settings saved it."""
    from transformers import AutoModelForCausalLM

    directory = Path(args.out) / f"teacher-{args.teacher_steps}-{args.frames}-{args.grid}-{args.seed}"
    if (directory / "adapter").is_dir():
        llm = AutoModelForCausalLM.from_pretrained(directory / "llm")
        teacher = VideoModel.from_pretrained(llm, directory / "adapter", tokenizer=tokenizer)
        return teacher, json.loads((directory / "train.json").read_text())
    torch.manual_seed(args.seed)
    llm = build_small_llm(len(tokenizer) + 1, args.seed)
    settings = method_settings("llava", args.frames)
    config = VideoAdapterConfig(method="llava", vision_hidden_size=vision_width, num_frames=args.frames,
                                **settings.adapter)
    teacher = wrap_model(llm, config, tokenizer=tokenizer, stage="sft")
    result = train(teacher, train_feats, VideoQACollator(tokenizer, teacher.video_token, train=True),
                   TrainConfig(steps=args.teacher_steps, batch_size=args.batch_size, lr=settings.lr, seed=args.seed,
                               log_every=max(args.teacher_steps // 4, 1), progress=False), log=log)
    teacher.save_pretrained(directory / "adapter")
    teacher.save_base_model(directory / "llm")
    info = {"seconds": result.seconds, "final_loss": result.final_loss()}
    (directory / "train.json").write_text(json.dumps(info) + "\n")
    return teacher, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/video2lora")
    parser.add_argument("--frames", type=int, default=8, help="Training length (= segment length).")
    parser.add_argument("--train-size", type=int, default=3000)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--teacher-steps", type=int, default=1000)
    parser.add_argument("--student-steps", type=int, default=1000)
    parser.add_argument("--chunk-steps", type=int, default=0, help="Chunk-training steps (0 = skip the stage).")
    parser.add_argument("--long-factor", type=int, default=4, help="Long videos: this many segments.")
    parser.add_argument("--long-test-size", type=int, default=500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--answers", choices=["dataset", "teacher"], default="dataset")
    parser.add_argument("--kl", type=float, default=0.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--l1", type=float, default=0.0)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["mlp"])
    parser.add_argument("--instruction", default="")
    parser.add_argument("--hypernet", default='{"latent_dim": 128, "num_latents": 8, "depth": 2, "num_heads": 4, '
                                              '"head_dim": 32, "kv_heads": 2, "head_hidden": 256}')
    parser.add_argument("--grid", type=int, default=4, help="Object-grid front end: grid × grid tokens per frame.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    log = print
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data_cfg = MovingShapesConfig(num_frames=args.frames, seed=args.seed)
    tokenizer = moving_shapes_tokenizer(data_cfg)
    front_end = ObjectGridFrontEnd(ObjectGridConfig(image_size=data_cfg.frame_size, grid=args.grid))
    encoder = front_end.vision_encoder(chunk_size=1024, progress=False)
    train_feats, test_feats, standardizer = features_of(data_cfg, args.train_size, args.test_size, encoder)
    log(f"data: {len(train_feats)} train / {len(test_feats)} test, features {tuple(train_feats[0].video.shape)} "
        f"({time.perf_counter() - t0:.0f}s)")

    teacher, teacher_info = teacher_model(args, tokenizer, encoder.hidden_size, train_feats, log)
    rows: dict[str, dict] = {}
    rows["llava teacher (video in context)"] = evaluate(teacher, test_feats, batch_size=100)
    log(f"teacher: {json.dumps({k: round(100 * v, 1) for k, v in rows['llava teacher (video in context)'].items()})}")

    targets = train_feats
    if args.answers == "teacher":
        answers = teacher_answers(teacher, train_feats, max_new_tokens=2, batch_size=100,
                                  cache=out / f"teacher-answers-{args.teacher_steps}-{args.seed}.json")
        targets = with_answers(train_feats, answers)
    hypernet = json.loads(args.hypernet) | {"instruction": args.instruction}
    config = VideoAdapterConfig(method="video2lora", vision_hidden_size=encoder.hidden_size, num_frames=args.frames,
                                rank=args.rank, inject_every=1, targets=tuple(args.targets), options=hypernet)
    torch.manual_seed(args.seed)
    student = wrap_model(teacher.llm, config, tokenizer=tokenizer, teacher=teacher, stage="pretrain")
    collate = VideoQACollator(tokenizer, student.video_token, train=True)
    recipe = dict(batch_size=args.batch_size, lr=args.lr, kl_weight=args.kl, temperature=args.temperature,
                  l1_weight=args.l1, seed=args.seed, progress=False)
    result = distill(student, targets, collate,
                     DistillConfig(steps=args.student_steps, log_every=max(args.student_steps // 4, 1), **recipe),
                     log=log)
    rows["video2lora student (0 visual tokens)"] = evaluate(student, test_feats, batch_size=100)
    log(f"student: {json.dumps({k: round(100 * v, 1) for k, v in rows['video2lora student (0 visual tokens)'].items()})}"
        f" ({result.seconds:.0f}s of distillation)")

    long_rows = {}
    if args.long_factor > 1:
        long_cfg = long_config(data_cfg, args.long_factor)
        _, long_test, _ = features_of(long_cfg, 0, args.long_test_size, encoder, standardizer)
        long_rows["composed, no chunk training"] = evaluate(student, long_test, batch_size=50)
        log(f"long ({long_cfg.num_frames} frames), composed without chunk training: "
            f"{json.dumps({k: round(100 * v, 1) for k, v in long_rows['composed, no chunk training'].items()})}")
        if args.chunk_steps:
            mixed = []
            per = args.train_size // args.long_factor
            for k in range(1, args.long_factor + 1):
                cfg_k = dataclasses.replace(long_config(data_cfg, k), seed=args.seed + 100 + k)
                feats_k, _, _ = features_of(cfg_k, per, 1, encoder, standardizer)
                mixed.extend(feats_k)
            chunk = distill(student, mixed, collate,
                            DistillConfig(steps=args.chunk_steps, log_every=max(args.chunk_steps // 4, 1),
                                          description="chunk training", **recipe), log=log)
            long_rows["composed, after chunk training (1..k segments)"] = evaluate(student, long_test, batch_size=50)
            rows["video2lora student after chunk training"] = evaluate(student, test_feats, batch_size=100)
            log(f"after chunk training ({chunk.seconds:.0f}s): long "
                f"{json.dumps({k: round(100 * v, 1) for k, v in long_rows[list(long_rows)[-1]].items()})}")

    chance = chance_accuracy(data_cfg)
    summary = {"args": vars(args), "teacher": teacher_info, "chance": chance, "rows": rows, "long_rows": long_rows,
               "seconds": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    keys = list(next(iter(rows.values())))
    print("\n| " + " | ".join(["", *keys]) + " |\n|" + "---|" * (len(keys) + 1))
    print("| chance | " + " | ".join(f"{100 * chance[k]:.1f}" if k in chance else "" for k in keys) + " |")
    for name, acc in {**rows, **{f"long ×{args.long_factor}: {k}": v for k, v in long_rows.items()}}.items():
        print(f"| {name} | " + " | ".join(f"{100 * acc[k]:.1f}" if k in acc else "" for k in keys) + " |")
    print(f"\ntotal {summary['seconds']:.0f}s")


if __name__ == "__main__":
    main()
