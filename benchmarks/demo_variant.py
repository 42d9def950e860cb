"""Train one method as `video2param demo` does, with adapter settings of your own, and print its accuracy per type.

The demo's data (MovingShapes at ``--frames``), object-grid front end, training-set standardisation, small LM and
recipe (AdamW, warm-up then cosine, batch 32) are used as in ``video2param demo --seed S``; only the method's
settings change: ``--adapter`` holds ``VideoAdapterConfig`` fields as JSON (options included), replacing the
demo's ``METHOD_SETTINGS`` entry when given. A method that learns from a teacher (Video2LoRA) reads a finished
demo run: ``--teacher-run DIR`` takes ``DIR/llava`` (its trained LM and adapter, frozen) as the demo does.

    python benchmarks/demo_variant.py video2lora --teacher-run runs/demo_all --seed 0 \\
        --adapter '{"rank": 8, "targets": ["mlp"], "options": {"context_positions": false}}'

With the demo's settings (no ``--adapter``) the accuracies equal the method's row of ``video2param demo --method all
--seed S`` (same data, LM, initialisation and batches).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method")
    parser.add_argument("--adapter", default=None,
                        help="VideoAdapterConfig fields as JSON (default: the demo's settings for the method)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the demo's)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: the demo's, 1200 times the method's step_factor)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=3000)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher-run", default=None,
                        help="a `video2param demo --method all` output directory whose llava is the teacher")
    parser.add_argument("--kl-weight", type=float, default=None,
                        help="a method with a teacher: distil with this weight on KL(teacher || student) at the "
                             "answer positions, 0 = the answers alone (default: the demo's setting)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="append the result as one JSON line to this file")
    args = parser.parse_args()

    from video2param import VideoAdapterConfig, wrap_model
    from video2param.data import VideoQACollator, evaluate
    from video2param.demo import DemoConfig, build_small_llm, demo_data, fit, method_options, method_settings
    from video2param.methods.base import get_method
    from video2param.train import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    needs_teacher = "teacher" in get_method(args.method).needs
    if "text_encoder" in get_method(args.method).needs:
        parser.error(f"{args.method} reads a text tower: use benchmarks/ppllava_movingshapes.py, which aligns one")
    if needs_teacher and args.teacher_run is None:
        parser.error(f"{args.method} learns from a teacher: pass --teacher-run (a demo output directory)")
    if args.kl_weight is not None and not needs_teacher:
        parser.error(f"--kl-weight: {args.method} has no teacher to distil")
    adapter = json.loads(args.adapter) if args.adapter is not None else method_options(args.method, args.frames)
    adapter.setdefault("num_frames", args.frames)
    settings = method_settings(args.method, args.frames)
    lr = args.lr if args.lr is not None else settings.lr
    steps = args.steps if args.steps is not None else settings.steps(DemoConfig().steps)

    data = demo_data(args.frames, args.seed, args.train_size, args.test_size)
    tokenizer, encoder, train_feats, test_feats = data.tokenizer, data.encoder, data.train_feats, data.test_feats
    vocab_size = len(tokenizer) + 1  # the video token, added by wrap_model (fixed first, as the demo does)

    teacher, stage, llm = None, "sft", None
    if needs_teacher:
        from transformers import AutoModelForCausalLM

        run = Path(args.teacher_run)
        llm = AutoModelForCausalLM.from_pretrained(run / "llava" / "llm")
        teacher, stage = str((run / "llava" / "adapter").resolve()), "pretrain"
    # The demo's order: seed, then build the LM, then the method (whose initialisation follows the LM's draws).
    torch.manual_seed(args.seed)
    if llm is None:
        llm = build_small_llm(vocab_size, args.seed)
    config = VideoAdapterConfig(method=args.method, vision_hidden_size=encoder.hidden_size, **adapter)
    vm = wrap_model(llm, config, tokenizer=tokenizer, stage=stage, teacher=teacher)
    collate = VideoQACollator(tokenizer, vm.video_token, train=True)
    start = time.perf_counter()
    recipe = TrainConfig(steps=steps, batch_size=args.batch_size, lr=lr, seed=args.seed,
                         log_every=max(steps // 4, 1), progress=False)
    kl_weight = args.kl_weight if args.kl_weight is not None else settings.kl_weight
    result = fit(vm, train_feats, collate, recipe, kl_weight, log=print)
    accuracy = evaluate(vm, test_feats, batch_size=100)
    row = {"method": args.method, "seed": args.seed, "lr": lr, "steps": steps, "adapter": adapter,
           "kl_weight": kl_weight,
           "accuracy": {k: round(100 * v, 1) for k, v in accuracy.items()}, "final_loss": result.final_loss(),
           "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(row))
    if args.output:
        with open(args.output, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
