"""Command line: `video2param demo | ask | train | bench` (also `python -m video2param ...`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def _add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
        parser.add_argument(flag, type=kind, default=f.default, help=f"{help_text} (default: {f.default})")


def build_parser() -> argparse.ArgumentParser:
    from .demo import DemoConfig

    parser = argparse.ArgumentParser(prog="video2param", description="Make any HuggingFace causal LM understand video.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="Train a method (or all) and the llava baseline on MovingShapes (CPU), "
                                       "compare them, and save what `ask` needs.")
    _add_dataclass_args(demo, DemoConfig)

    ask = sub.add_parser("ask", help="Answer a question about a video file with a saved adapter.")
    ask.add_argument("video", help="Video file (mp4, webm, avi, gif, ...).")
    ask.add_argument("question", help="The question.")
    ask.add_argument("--adapter", required=True, help="Adapter directory or Hub repo id.")
    ask.add_argument("--llm", required=True, help="Base LM name or path the adapter was trained on (the demo saves "
                                                  "its trained LM in <output>/<method>/llm).")
    ask.add_argument("--vision", required=True, help="Vision tower name or path, or the demo's <output>/vision "
                                                     "(front end + feature statistics).")
    ask.add_argument("--tokenizer", default=None, help="Tokenizer name or path (default: --llm).")
    ask.add_argument("--frames", type=int, default=None, help="Frames to sample (default: the adapter's num_frames).")
    ask.add_argument("--max-new-tokens", type=int, default=32)
    ask.add_argument("--revision", default=None, help="Hub revision of the adapter.")

    from .train_cli import add_train_arguments

    add_train_arguments(sub.add_parser("train", help="Train a video adapter on a video QA file (.jsonl/.json of "
                                                     "video paths and conversations) with checkpoints that resume."))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import DemoConfig, run_demo

        fields = {f.name for f in dataclasses.fields(DemoConfig)}
        try:
            cfg = DemoConfig(**{k: v for k, v in vars(args).items() if k in fields})
        except ValueError as err:
            print(f"video2param demo: {err}", file=sys.stderr)
            return 2
        run_demo(cfg)
        return 0
    if args.command == "ask":
        from .ask import ask

        try:
            print(ask(args.video, args.question, adapter=args.adapter, llm=args.llm, vision=args.vision,
                      tokenizer=args.tokenizer, frames=args.frames, max_new_tokens=args.max_new_tokens,
                      revision=args.revision))
        except (ValueError, FileNotFoundError) as err:
            print(f"video2param ask: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command == "train":
        from .train_cli import run_train_command

        return run_train_command(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
