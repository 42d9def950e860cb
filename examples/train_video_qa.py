"""Write a small video QA dataset of MP4 files, then train a video adapter on it with `video2param train`.

Everything is made here and offline: MovingShapes clips written as H.264 MP4 (PyAV), a train and an eval file in
the LLaVA-Video / Video-ChatGPT JSONL format, a small Llama-style LM with a word tokenizer and a small CLIP vision
tower built from configs and saved like Hub checkpoints. Then the command line a user runs on their own data:

    video2param train runs/train_video_qa/data/train.jsonl --llm runs/train_video_qa/llm --vision ... \\
        --method vipe --output runs/train_video_qa/run --eval-data .../eval.jsonl

Run it again and the run continues from its last checkpoint. With real checkpoints only the two model paths change
(e.g. ``--llm Qwen/Qwen2.5-0.5B-Instruct --vision google/siglip-base-patch16-224``); see docs/training.md.

Usage: python examples/train_video_qa.py [--videos 48] [--steps 60] [--output runs/train_video_qa]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def write_dataset(folder: Path, count: int, eval_count: int, seed: int) -> tuple[Path, Path]:
    """MP4 clips and two JSONL files (train, eval) in ``folder``: one question per clip, as MovingShapes asks it."""
    from video2param.data import MovingShapesConfig, make_splits
    from video2param.data.video_file import write_mp4

    config = MovingShapesConfig(num_frames=8, seed=seed)
    files = []
    for name, split in zip(("train", "eval"), make_splits(config, count, eval_count)):
        rows = []
        for i in range(len(split)):
            item = split[i]
            clip = f"clips/{name}_{i:04d}.mp4"
            write_mp4(folder / clip, item.video)
            rows.append({"video": clip, "conversations": [
                {"from": "human", "value": f"<video>\n{item.question}"}, {"from": "gpt", "value": item.answer}]})
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        files.append(path)
    return files[0], files[1]


def save_small_models(folder: Path, seed: int) -> tuple[Path, Path]:
    """A word tokenizer + small Llama (``folder/llm``) and a small CLIP vision tower (``folder/vision``)."""
    from transformers import AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, LlamaConfig

    from video2param.data import MovingShapesConfig, moving_shapes_tokenizer

    tok = moving_shapes_tokenizer(MovingShapesConfig(), extra_special_tokens=["<video>"])
    torch.manual_seed(seed)
    llm = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    llm.save_pretrained(folder / "llm")
    tok.save_pretrained(folder / "llm")
    tower = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4))
    tower.save_pretrained(folder / "vision")
    return folder / "llm", folder / "vision"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/train_video_qa", help="Where data, models and the run go.")
    parser.add_argument("--videos", type=int, default=48, help="Training clips (default: 48).")
    parser.add_argument("--eval-videos", type=int, default=16, help="Held-out clips (default: 16).")
    parser.add_argument("--steps", type=int, default=60, help="Training steps (default: 60).")
    parser.add_argument("--method", default="vipe", help="Video method (default: vipe).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from video2param.cli import main as cli

    root = Path(args.output)
    train, held_out = (root / "data" / "train.jsonl", root / "data" / "eval.jsonl")
    if not train.is_file():
        train, held_out = write_dataset(root / "data", args.videos, args.eval_videos, args.seed)
        print(f"wrote {args.videos} + {args.eval_videos} MP4 clips and {train}, {held_out}")
    llm, vision = root / "llm", root / "vision"
    if not (llm / "config.json").is_file():
        llm, vision = save_small_models(root, args.seed)
    options = ["--option", "rank=16", "--option", "hidden_dim=128", "--option", "depth=2", "--option",
               "inject_every=1"] if args.method == "vipe" else []
    command = ["train", str(train), "--llm", str(llm), "--vision", str(vision), "--method", args.method,
               "--output", str(root / "run"), "--eval-data", str(held_out), "--frames", "8", "--steps",
               str(args.steps), "--batch-size", "8", "--lr", "1e-3", "--eval-steps", str(max(args.steps // 3, 1)),
               "--save-steps", str(max(args.steps // 3, 1)), "--logging-steps", "10", "--seed", str(args.seed),
               *options]
    print("video2param " + " ".join(command))
    return cli(command)


if __name__ == "__main__":
    raise SystemExit(main())
