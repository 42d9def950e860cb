"""ViPE training reliability sweep: learning rate × rank × stage → accuracy on a static question, against llava.

The task is MovingShapes reduced to its static core: one object per video, one question ("what colour is the
object?", 4 colours, chance 25%). Frames become raw 8×8-pixel patch features (16 per frame, 192-d), standardised
with training-set statistics, so no vision tower (random or learned) sits between the pixels and the methods.
The LM is the demo's 128-wide, 4-layer Llama built from its config.

Two stages, as users run them:

* ``sft``: the LM starts random and trains together with the adapter;
* ``pretrain``: the LM is first trained (once, cached per seed) on the *text side* of the task — prompts where the
  colour is stated in words ("the object is red . question: what colour is the object? answer: red") mixed with
  prompts without it — so it stands in for a pretrained LLM that can answer from context; then it is frozen and
  only the adapter trains.

Every run: AdamW, linear warm-up then cosine decay, gradient clipping at 1 (the schedule of
``video2param.train``), batch 32. Held-out accuracy (first answer token, teacher-forced argmax = the greedy answer
of a word tokenizer) is measured every ``--eval-every`` steps; the table reports the final accuracy (greedy
``video2param.data.evaluate`` on the test split) and the first step at which the held-out accuracy reached 95%.

    python benchmarks/vipe_sweep.py                                   # the full sweep (docs/vipe-training.md)
    python benchmarks/vipe_sweep.py --methods vipe --lrs 1e-3 --ranks 16 --stages sft --trace   # one run, traced

``--trace`` prints, every eval, the gradient norm of each parameter group, the norms of W_l and of the generated
A, and the size of the delta relative to the base output of the targets (used to find the root cause).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from video2param import VideoAdapterConfig, wrap_model
from video2param.data import (
    PROMPT_WORDS,
    MovingShapesConfig,
    VideoQA,
    VideoQACollator,
    build_word_tokenizer,
    evaluate,
    make_splits,
    moving_shapes_vocabulary,
)
from video2param.data.collate import IGNORE_INDEX

TEXT_WORDS = ("the", "object", "is", ".")  # the text-side pretraining states the colour in words
LM_WIDTH, LM_LAYERS, LM_FFN, LM_HEADS = 128, 4, 256, 4


# ---- task ----------------------------------------------------------------------------------------------------
@dataclass
class Task:
    train: list[VideoQA]
    test: list[VideoQA]
    tokenizer: Any
    colors: tuple[str, ...]
    vocab_size: int  # fixed once: wrap_model adds the video token to the tokenizer it is given


def pixel_patches(video: torch.Tensor, patch: int = 8) -> torch.Tensor:
    """(T, 3, H, W) → (T, (H/patch)·(W/patch), 3·patch²): each patch's raw pixels, row-major over the grid."""
    t, c, h, w = video.shape
    x = video.reshape(t, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(t, (h // patch) * (w // patch), c * patch * patch)


def build_task(frames: int, train_size: int, test_size: int, seed: int) -> Task:
    """One-object MovingShapes colour questions, as standardised pixel-patch features."""
    cfg = MovingShapesConfig(num_frames=frames, max_objects=1, question_types=("color",), seed=seed)
    train_set, test_set = make_splits(cfg, train_size, test_size)
    train = [dataclasses.replace(it, video=pixel_patches(it.video)) for it in train_set]
    test = [dataclasses.replace(it, video=pixel_patches(it.video)) for it in test_set]
    flat = torch.cat([it.video.flatten(0, -2) for it in train])
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-3)
    train = [dataclasses.replace(it, video=(it.video - mean) / std) for it in train]
    test = [dataclasses.replace(it, video=(it.video - mean) / std) for it in test]
    tokenizer = build_word_tokenizer(moving_shapes_vocabulary(cfg) + list(PROMPT_WORDS) + list(TEXT_WORDS))
    return Task(train, test, tokenizer, tuple(cfg.colors), len(tokenizer) + 1)  # +1: the video token


def build_lm(vocab_size: int, seed: int):
    """The demo's LM shape: a Llama-style 128-wide, 4-layer model from its config (random weights)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=LM_WIDTH, intermediate_size=LM_FFN,
                         num_hidden_layers=LM_LAYERS, num_attention_heads=LM_HEADS, num_key_value_heads=LM_HEADS,
                         max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                         tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


# ---- schedule ------------------------------------------------------------------------------------------------
def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 0 (as ``video2param.train``)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def batches(n_items: int, batch_size: int, seed: int):
    """Endless shuffled index batches (a fresh permutation per epoch)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n_items, generator=generator).tolist()
        for start in range(0, n_items - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


# ---- text-side pretraining (the stand-in for a pretrained LLM) ----------------------------------------------
def text_side_prompts(items: Sequence[VideoQA], colors: Sequence[str], seed: int) -> list[tuple[str, str]]:
    """(prompt, answer) pairs: half state the colour in words, half do not (the LM learns the answer prior)."""
    rng = torch.Generator().manual_seed(seed)
    out = []
    for i, it in enumerate(items):
        if i % 2 == 0:
            out.append((f"the object is {it.answer} . question: {it.question} answer:", it.answer))
        else:
            guess = colors[int(torch.randint(len(colors), (1,), generator=rng))]
            out.append((f"question: {it.question} answer:", guess))
    return out


def text_batch(tokenizer, pairs: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
    rows, labels = [], []
    for prompt, answer in pairs:
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + a)
        labels.append([IGNORE_INDEX] * len(p) + a)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    lab = torch.full((len(rows), width), IGNORE_INDEX)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)], lab[i, : len(l)], mask[i, : len(r)] = torch.tensor(r), torch.tensor(l), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def text_pretrained_lm_state(task: Task, seed: int, steps: int = 300, lr: float = 2e-3,
                             cache: Path | None = None, log: Callable[[str], None] = print) -> dict[str, torch.Tensor]:
    """Train the random LM on the text side of the task once; returns its state dict (cached on disk)."""
    if cache is not None and cache.is_file():
        return load_file(cache)
    lm = build_lm(task.vocab_size, seed)
    pairs = text_side_prompts(task.train, task.colors, seed)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr)
    lm.train()
    for step, index in zip(range(steps), batches(len(pairs), 32, seed)):
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, steps, 20)
        loss = lm(**text_batch(task.tokenizer, [pairs[i] for i in index])).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
    lm.eval()
    stated = [p for i, p in enumerate(text_side_prompts(task.test, task.colors, seed)) if i % 2 == 0]
    acc = first_token_accuracy_text(lm, task.tokenizer, stated)
    log(f"text-side LM: {steps} steps, accuracy when the colour is stated {100 * acc:.1f}%")
    state = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, cache)
    return state


@torch.no_grad()
def first_token_accuracy_text(lm, tokenizer, pairs) -> float:
    batch = text_batch(tokenizer, pairs)
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return _first_answer_hits(logits, batch["labels"]).float().mean().item()


def _first_answer_hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: does the argmax at the position before the first supervised label equal that label?"""
    first = (labels != IGNORE_INDEX).float().argmax(dim=1)
    rows = torch.arange(labels.shape[0])
    return logits[rows, first - 1].argmax(-1) == labels[rows, first]


@torch.no_grad()
def held_out_accuracy(vm, items: Sequence[VideoQA], tokenizer) -> float:
    """Greedy first answer token on left-padded prompts (what ``generate`` would answer first), in one forward."""
    collate = VideoQACollator(tokenizer, vm.video_token, train=False)
    was = vm.training
    vm.eval()
    hits = []
    for start in range(0, len(items), 128):
        chunk = items[start : start + 128]
        batch = collate(chunk)
        logits = vm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    videos=batch["videos"]).logits[:, -1]
        answers = torch.tensor([tokenizer(" " + it.answer, add_special_tokens=False)["input_ids"][0] for it in chunk])
        hits.append(logits.argmax(-1) == answers)
    vm.train(was)
    return torch.cat(hits).float().mean().item()


# ---- one run ---------------------------------------------------------------------------------------------------
@dataclass
class Case:
    method: str
    stage: str
    lr: float
    rank: int = 16
    alpha: float | None = None  # None: the config default
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    group_lr: dict[str, float] = dataclasses.field(default_factory=dict)  # diagnostic: lr multiplier per group

    def label(self) -> str:
        if self.method == "llava":
            return f"llava {self.stage} lr={self.lr:g}"
        extra = "".join(f" {k}={v}" for k, v in self.options.items())
        extra += "".join(f" lr[{k}]×{v:g}" for k, v in self.group_lr.items())
        alpha = "" if self.alpha is None else f" alpha={self.alpha:g}"
        return f"vipe {self.stage} lr={self.lr:g} r={self.rank}{alpha}{extra}"


def adapter_config(case: Case, task: Task) -> VideoAdapterConfig:
    frames = task.train[0].video.shape[0]
    dv = task.train[0].video.shape[-1]
    common: dict[str, Any] = {"num_frames": frames, "vision_hidden_size": dv}
    if case.method == "vipe":
        common |= {"rank": case.rank, "inject_every": 1,
                   "options": {"hidden_dim": 128, "num_heads": 4, "depth": 2} | case.options}
        if case.alpha is not None:
            common["alpha"] = case.alpha
    return VideoAdapterConfig(method=case.method, **common)


def run_case(case: Case, task: Task, lm_state: dict[str, torch.Tensor] | None, steps: int, batch_size: int,
             eval_every: int, seed: int, trace: bool = False, log: Callable[[str], None] = print,
             stop_after: int = 0) -> dict[str, Any]:
    """Train one configuration; returns accuracy, steps to 95%, step time and the loss curve.

    ``stop_after`` > 0 ends the run once that many evaluations in a row reached 95% (the accuracy reported is then
    the held-out accuracy at that step; a run that never gets there trains for all ``steps``)."""
    lm = build_lm(task.vocab_size, seed)
    if case.stage == "pretrain":
        lm.load_state_dict(lm_state)
    torch.manual_seed(seed)
    vm = wrap_model(lm, adapter_config(case, task), tokenizer=task.tokenizer, stage=case.stage)
    collate = VideoQACollator(task.tokenizer, vm.video_token, train=True)
    held_out = task.test[:256]
    params = [p for p in vm.parameters() if p.requires_grad]
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in vm.named_parameters():
        if p.requires_grad:
            groups.setdefault(case.group_lr.get(parameter_group(name), 1.0), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "lr": case.lr * m, "multiplier": m} for m, ps in groups.items()],
                            lr=case.lr, weight_decay=0.0)
    losses: list[float] = []
    curve: list[tuple[int, float]] = []
    reached: int | None = None
    streak = 0
    step_seconds = 0.0
    vm.train()
    for step, index in zip(range(steps), batches(len(task.train), batch_size, seed)):
        for group in opt.param_groups:
            group["lr"] = case.lr * group["multiplier"] * lr_factor(step, steps, 20)
        batch = collate([task.train[i] for i in index])
        start = time.perf_counter()
        loss = vm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                  videos=batch["videos"]).loss
        if not torch.isfinite(loss):
            log(f"  {case.label()}: loss {loss.item()} at step {step}")
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norms = group_grad_norms(vm) if trace and (step + 1) % eval_every == 0 else None
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step_seconds += time.perf_counter() - start
        losses.append(loss.item())
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            acc = held_out_accuracy(vm, held_out, task.tokenizer)
            curve.append((step + 1, acc))
            if reached is None and acc >= 0.95:
                reached = step + 1
            streak = streak + 1 if acc >= 0.95 else 0
            if trace:
                log(f"  step {step + 1:4d} loss {statistics.fmean(losses[-eval_every:]):.3f} acc {100 * acc:5.1f} "
                    + describe_trace(vm, norms, batch))
            if stop_after and streak >= stop_after:
                break
    final = evaluate(vm, task.test, batch_size=128)["color"]
    return {"case": dataclasses.asdict(case), "label": case.label(), "accuracy": final, "steps_to_95": reached,
            "steps_run": len(losses),
            "step_s": step_seconds / max(len(losses), 1), "final_loss": statistics.fmean(losses[-20:]),
            "curve": curve}


# ---- tracing (root-cause measurements) ---------------------------------------------------------------------------
def parameter_group(name: str) -> str:
    """Coarse group of a VideoModel parameter name, for the gradient-norm trace."""
    if name.startswith("llm."):
        return "llm"
    short = name.removeprefix("method.")
    for prefix in ("W_l", "to_A", "queries", "input_proj", "frame_embedding", "blocks", "final_norm", "projector"):
        if short.startswith(prefix):
            return prefix
    return short.split(".")[0]


def group_grad_norms(vm) -> dict[str, float]:
    sums: dict[str, float] = {}
    for name, p in vm.named_parameters():
        if p.grad is not None:
            g = parameter_group(name)
            sums[g] = sums.get(g, 0.0) + float(p.grad.float().pow(2).sum())
    return {k: math.sqrt(v) for k, v in sums.items()}


@torch.no_grad()
def describe_trace(vm, norms: dict[str, float] | None, batch) -> str:
    parts = []
    if norms:
        parts.append("grad " + " ".join(f"{k}={v:.2e}" for k, v in sorted(norms.items())))
    method = vm.method
    if hasattr(method, "W_l"):
        ctx = vm.encode_video(batch["videos"][:8])
        ratios, a_norms, a_spread = [], [], []
        for key, lr in ctx.deltas.items():
            A = lr.A.float()
            a_norms.append(A.norm(dim=-1).mean().item())  # norm of one generated A row
            a_spread.append((A - A.mean(0, keepdim=True)).norm(dim=-1).mean().item())  # its per-video part
        w_l = [w.float().norm(dim=-1).mean().item() for k, w in method.effective_generators().items()
               if k.startswith("W_l.")]
        parts.append(f"|W_l row| {statistics.fmean(w_l):.3f} |A row| {statistics.fmean(a_norms):.3f} "
                     f"(per-video {statistics.fmean(a_spread):.3f})")
        ratio = delta_to_base_ratio(vm, batch)
        if ratio is not None:
            parts.append(f"|delta|/|base| {ratio:.3f}")
    return "  ".join(parts)


@torch.no_grad()
def delta_to_base_ratio(vm, batch) -> float | None:
    """Mean over target modules of ‖delta output‖ / ‖base output‖ on a training batch."""
    from video2param.inject.lowrank import LowRankWrapper

    records: list[float] = []
    hooks = []
    for module in vm.llm.modules():
        if isinstance(module, LowRankWrapper):
            def hook(mod, args, out, _records=records):
                base = mod.base(args[0])
                _records.append(((out - base).norm() / base.norm().clamp_min(1e-12)).item())
            hooks.append(module.register_forward_hook(hook))
    try:
        was = vm.training
        vm.eval()
        vm(input_ids=batch["input_ids"][:8], attention_mask=batch["attention_mask"][:8], videos=batch["videos"][:8])
        vm.train(was)
    finally:
        for h in hooks:
            h.remove()
    return statistics.fmean(records) if records else None


# ---- the sweep ------------------------------------------------------------------------------------------------
def format_table(results: list[dict[str, Any]], steps: int) -> str:
    lines = ["| method | stage | lr | rank | options | colour accuracy (%) | steps to 95% | steps run | step (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["case"]
        rank = "—" if c["method"] == "llava" else str(c["rank"])
        reached = "—" if r["steps_to_95"] is None else str(r["steps_to_95"])
        options = ", ".join([f"{k}={v}" for k, v in c["options"].items()]
                            + [f"lr[{k}]×{v:g}" for k, v in c["group_lr"].items()]) or "—"
        lines.append(f"| {c['method']} | {c['stage']} | {c['lr']:g} | {rank} | {options} | {100 * r['accuracy']:.1f} | "
                     f"{reached} | {r['steps_run']} | {r['step_s']:.3f} |")
    lines.append(f"\n{steps} steps of batch 32; 'steps to 95%' = first evaluation at which the held-out accuracy "
                 "reached 95% (— = never); a run ends after two evaluations in a row at >= 95%, and its "
                 "accuracy is the greedy held-out accuracy at that point.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["llava", "vipe"])
    parser.add_argument("--stages", nargs="+", default=["sft", "pretrain"])
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-4, 5e-4, 1e-3, 2e-3])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--alpha", type=float, default=None, help="ViPE alpha (default: the config default).")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=JSON",
                        help="Extra ViPE option, e.g. --option a_lr_ratio=1.0 (repeatable).")
    parser.add_argument("--group-lr", action="append", default=[], metavar="GROUP=MULT",
                        help="Diagnostic: multiply the lr of one parameter group (W_l, to_A, blocks, llm, ...).")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--stop-after", type=int, default=2,
                        help="End a run after this many evaluations in a row at >= 95%% (0: always run --steps).")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trace", action="store_true", help="Print gradient and delta norms at every eval.")
    parser.add_argument("--cache", default="runs/vipe_sweep", help="Directory for the text-side LM and results.")
    parser.add_argument("--out", default=None, help="JSON file for the results (default: <cache>/results.json).")
    parser.add_argument("--table", nargs="+", metavar="JSON", default=None,
                        help="Only print the table of earlier runs' result files (in this order).")
    args = parser.parse_args()
    if args.table:
        files = [json.loads(Path(f).read_text()) for f in args.table]
        print(format_table([r for f in files for r in f["results"]], files[0]["args"]["steps"]))
        return
    torch.set_num_threads(args.threads)

    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        options[key] = json.loads(value)
    group_lr = {}
    for item in args.group_lr:
        key, _, value = item.partition("=")
        group_lr[key] = float(value)
    cache = Path(args.cache)
    task = build_task(args.frames, args.train_size, args.test_size, args.seed)
    lm_state = None
    if "pretrain" in args.stages:
        lm_state = text_pretrained_lm_state(task, args.seed, cache=cache / f"text_lm_seed{args.seed}.safetensors")
    cases = []
    for stage in args.stages:
        for lr in args.lrs:
            for method in args.methods:
                ranks = args.ranks if method == "vipe" else [None]
                for rank in ranks:
                    cases.append(Case(method, stage, lr, rank or 16, args.alpha if method == "vipe" else None,
                                      options if method == "vipe" else {}, group_lr if method == "vipe" else {}))
    results = []
    out = Path(args.out) if args.out else cache / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for case in cases:
        start = time.perf_counter()
        r = run_case(case, task, lm_state, args.steps, args.batch_size, args.eval_every, args.seed, args.trace,
                     stop_after=args.stop_after)
        results.append(r)
        reached = r["steps_to_95"] if r["steps_to_95"] is not None else "never"
        print(f"{r['label']}: accuracy {100 * r['accuracy']:.1f}%, 95% at {reached}, step {r['step_s']:.3f}s, "
              f"loss {r['final_loss']:.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
        out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))  # after every run
    print("\n" + format_table(results, args.steps))


if __name__ == "__main__":
    main()
