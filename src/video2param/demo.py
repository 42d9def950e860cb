"""`video2param demo`: train methods and the llava baseline on MovingShapes on the CPU and compare them.

Everything is built in code (a small Llama-style LM, the demo's vision front end, a word tokenizer), so the demo
needs no network. Users who have real checkpoints pass ``--llm`` / ``--vision`` names or paths.

What one run does:

1. generates the MovingShapes train and held-out splits and encodes every video once with the frozen vision front
   end (:class:`~video2param.data.front_end.ObjectGridFrontEnd` unless ``--vision`` names a tower); channels are
   standardised with training-set statistics;
2. for each method (``--method``; ``all`` = every registered method) and the llava baseline: wraps a fresh LM with
   the same seed, trains adapter and LM (stage ``sft``) for the same steps and batch size, answers the held-out
   questions greedily and measures its costs (visual tokens, LLM FLOPs, time to first token, train step);
3. prints one table with the accuracy per question type, chance per type, and the costs as ratios to the baseline;
4. saves everything ``video2param ask`` needs under ``--output-dir`` (per method: ``adapter/`` and the trained LM
   with its tokenizer in ``llm/``; the front end with its statistics in ``vision/``), writes a held-out video as an
   MP4, checks that the saved files answer its question, and prints the ``video2param ask`` command.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shlex
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .ask import hf_progress_bars_off
from .bench import CostReport, measure_costs
from .config import VideoAdapterConfig
from .data import MovingShapesConfig, VideoQACollator, chance_accuracy, evaluate, make_splits, moving_shapes_tokenizer
from .data.features import FeatureStandardizer, encode_dataset, save_vision, standardize_items
from .data.front_end import ObjectGridFrontEnd
from .model import VideoModel, wrap_model
from .train import TrainConfig, train

BASELINE = "llava"
ALL_METHODS = "all"


@dataclass
class DemoConfig:
    """Settings of ``video2param demo`` (each is a command-line flag: ``--train-size 3000``)."""

    method: str = field(default="vipe", metadata={"help": "Method to compare with the llava baseline, or 'all' for "
                                                          "every registered method."})
    steps: int = field(default=1200, metadata={"help": "Training steps per method (a method's step_factor in "
                                                       "METHOD_SETTINGS multiplies them)."})
    frames: int = field(default=8, metadata={"help": "Frames per MovingShapes video."})
    seed: int = field(default=0, metadata={"help": "Seed of data, models and training."})
    output_dir: str = field(default="runs/demo", metadata={"help": "Where adapters, LMs, the MP4 and results.json go."})
    train_size: int = field(default=3000, metadata={"help": "Training questions."})
    test_size: int = field(default=500, metadata={"help": "Held-out questions."})
    batch_size: int = field(default=32, metadata={"help": "Batch size."})
    lr: float | None = field(default=None, metadata={"help": "Peak learning rate for every method (default: per "
                                                             "method, see METHOD_SETTINGS)."})
    llm: str | None = field(default=None, metadata={"help": "HF causal LM name or path (default: a small Llama "
                                                            "from config)."})
    vision: str | None = field(default=None, metadata={"help": "HF vision tower name or path (default: the demo's "
                                                               "object-grid front end)."})
    stage: str = field(default="sft", metadata={"help": "What trains: sft = adapter + LLM, pretrain = adapter only."})
    threads: int | None = field(default=1, metadata={"help": "torch CPU threads; 0 = torch's choice. One by default: "
                                                         "the demo's small matrices gain little from more, and on a "
                                                         "busy machine extra threads make each step many times "
                                                         "slower."})
    progress: bool = field(default=True, metadata={"help": "Progress bars for encoding, training and evaluation."})

    def __post_init__(self) -> None:
        from .methods.base import available_methods

        known = available_methods()
        if self.method != ALL_METHODS and self.method not in known:
            raise ValueError(f"method: unknown method {self.method!r}; choose one of {', '.join(known)} or "
                             f"{ALL_METHODS!r}")
        for name in ("steps", "frames", "train_size", "test_size", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.stage not in ("sft", "pretrain"):
            raise ValueError(f"stage: expected 'sft' or 'pretrain', got {self.stage!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")


_LENGTH_SETTINGS = frozenset({"lr", "step_factor", "adapter"})  # what MethodSettings.from_frames may change


@dataclass(frozen=True)
class MethodSettings:
    """How the demo trains one method: its peak learning rate and its adapter settings for the small LM."""

    lr: float = field(metadata={"help": "Peak learning rate (AdamW, warm-up then cosine)."})
    adapter: dict[str, Any] = field(default_factory=dict,
                                    metadata={"help": "VideoAdapterConfig fields (options included)."})
    kl_weight: float | None = field(
        default=None,
        metadata={"help": "A method with a teacher: distil (video2param.distill) with this weight on KL(teacher ‖ "
                          "student) at the answer positions, besides the answers' cross-entropy; None: train on the "
                          "answers alone."})
    step_factor: int = field(
        default=1,
        metadata={"help": "The method trains for this many times the demo's --steps (a stage that is still learning "
                          "when the common budget ends; its row says how many steps it had)."})
    from_frames: dict[int, dict[str, Any]] = field(
        default_factory=dict,
        metadata={"help": "Settings that change with the video length: {frames: {'lr': ..., 'step_factor': ..., "
                          "'adapter': {...}}}, applied when --frames is at least that many (smallest key first; "
                          "adapter options merge into the ones above)."})
    why: str = field(default="", metadata={"help": "Where the numbers come from."})

    def __post_init__(self) -> None:
        if isinstance(self.step_factor, bool) or not isinstance(self.step_factor, int) or self.step_factor < 1:
            raise ValueError(f"step_factor: expected a positive int, got {self.step_factor!r}")
        for start, change in self.from_frames.items():
            unknown = set(change) - _LENGTH_SETTINGS
            if unknown:
                raise ValueError(f"from_frames[{start}]: unknown setting(s) {sorted(unknown)}; expected some of "
                                 f"{sorted(_LENGTH_SETTINGS)}")

    def steps(self, demo_steps: int) -> int:
        """Training steps of this method when the demo's budget is ``demo_steps``."""
        return demo_steps * self.step_factor

    def at(self, frames: int) -> "MethodSettings":
        """These settings as they apply to videos of ``frames`` frames."""
        settings = self
        for start in sorted(self.from_frames):
            if frames < start:
                break
            change = self.from_frames[start]
            extra = change.get("adapter", {})
            adapter = {**settings.adapter, **extra}
            adapter["options"] = {**settings.adapter.get("options", {}), **extra.get("options", {})}
            if not adapter["options"]:
                del adapter["options"]
            settings = dataclasses.replace(settings, lr=change.get("lr", settings.lr), adapter=adapter,
                                           step_factor=change.get("step_factor", settings.step_factor))
        return settings


#: Per-method settings of the demo. A method registered later and missing here trains with DEFAULT_SETTINGS.
#: The library defaults are the papers', for 7B LMs; these are sized for the demo's ~1M-parameter LM.
METHOD_SETTINGS: dict[str, MethodSettings] = {
    "llava": MethodSettings(
        lr=2e-3, from_frames={32: {"lr": 1e-3}},
        why="2e-3, the rate of the calibration runs, learns every question type at 8 frames (docs/results.md); at 32 "
            "frames it learned neither colour nor shape (37 and 59), 1e-3 learned every type (99.6% overall on "
            "seeds 0-2); lengths between were not measured"),
    "vipe": MethodSettings(
        lr=1e-3,
        adapter={"rank": 16, "alpha": 32.0, "inject_every": 1,
                 "options": {"hidden_dim": 128, "num_heads": 4, "depth": 2}},
        why="the library's defaults (queries at std 1, W_l at the full rate), sized for the small LM; lr 1e-3: over "
            "seeds 0-2 it scored 99.8% overall (direction 99, 100, 98; count 100) against 97.6% at llava's 2e-3, "
            "where seed 2's count fell to 78 (docs/results.md)",
    ),
    "linvt": MethodSettings(
        lr=1e-3,
        adapter={"options": {"hidden_dim": 128, "num_heads": 4, "scale_queries": [16, 8, 8]}},
        from_frames={32: {"adapter": {"options": {"scorer_reads_question": True}}, "step_factor": 2}},
        why="the paper's 512-wide, 112-query module is 34M parameters and 3.4 s per step beside this 0.8M LM; 128 "
            "wide with 16/8/8 queries keeps 4 scorer layers and the three scales: 32 tokens whatever the length "
            "(1/4 of llava's at 32 frames); 8/4/4 queries lagged llava by 6 points on direction. lr 1e-3: at llava's "
            "2e-3 one seed's loss rose mid-run and its count fell to 73; at 1e-3 count was 99-100 over three seeds "
            "(docs/results.md). From 32 frames the scorer also reads the question and LinVT trains 2400 steps: "
            "direction 100 / 100 / 99 over seeds 0-2, against 96 / 100 / 64 with neither (docs/results.md)",
    ),
    "ppllava": MethodSettings(
        lr=1e-3,
        adapter={"options": {"output_size": [3, 1, 1]}},
        step_factor=2,
        from_frames={32: {"adapter": {"options": {"output_size": [2, 2, 2], "extra_output_sizes": [[6, 1, 1]]}}}},
        why="its text tower is the demo's aligned dual encoder (video2param.data.text_alignment); lr 1e-3 "
            "(direction 99 / 51 / 100 over three seeds at 4 x 1 x 1, against 82 / 25 / 90 at llava's 2e-3). 2400 "
            "steps (its step costs a quarter to a half of llava's): at 1200 one seed of three missed direction at "
            "either length. At 8 frames 3 x 1 x 1, 3 tokens (10.7x fewer than llava's 32): direction 100 / 98 / 100 "
            "and every other type 100 over seeds 0-2 (4 x 1 x 1: 100 everywhere). From 32 frames two pooling sizes "
            "(the paper's combination): 2 x 2 x 2 keeps the grid, 6 x 1 x 1 keeps time, 14 tokens (9.1x fewer than "
            "llava's 128): direction 100 / 99 / 95, order 97 on each seed; 3 x 2 x 2 alone lost order at small "
            "appearance gaps (89-94 at 1200 and 2400 steps) (docs/results.md)",
    ),
    "video2lora": MethodSettings(
        lr=1e-3,
        adapter={"rank": 8, "inject_every": 1, "targets": ["mlp"],
                 "options": {"latent_dim": 128, "num_latents": 8, "depth": 2, "num_heads": 4, "head_dim": 32,
                             "kv_heads": 2, "head_hidden": 256, "input_mult": 1}},
        step_factor=4, from_frames={32: {"step_factor": 2}},
        why="the public code's hypernetwork (512 wide, 9 blocks) sized down for the 128-wide LM; rank 8 on the MLP "
            "of every layer; taught by the trained llava (frozen), only the hypernetwork trains; lr 1e-3, the rate "
            "of benchmarks/video2lora_moving_shapes.py (the recipe's 1e-4 is for 7B LMs; others not measured). "
            "More steps than the LM-training methods: at 1200 the student was still learning on every seed that "
            "missed direction. Over seeds 0-2, direction against the teacher: 8 frames 80.3 at 1200 steps, 87.3 at "
            "2400, 96.3 at 4800 (teacher 94.7); 32 frames 53.7 at 1200, 99.0 at 2400 (teacher 100; 4800 not "
            "measured there) (docs/results.md)",
    ),
}
DEFAULT_SETTINGS = MethodSettings(lr=1e-3, why="no tuned settings yet")


def method_settings(method: str, frames: int = 8) -> MethodSettings:
    """The demo's settings for ``method`` at ``frames`` frames (DEFAULT_SETTINGS for a method without its own
    entry)."""
    return METHOD_SETTINGS.get(method, DEFAULT_SETTINGS).at(frames)


def method_options(method: str, frames: int) -> dict[str, Any]:
    """VideoAdapterConfig keyword arguments of ``method`` in the demo (besides the method name)."""
    return {"num_frames": frames, **method_settings(method, frames).adapter}


#: Question types the demo asks about a lone object (see MovingShapesConfig.single_object_types): the baseline
#: learns binding a shape name to one of two objects, and motion while finding when an object is on screen, far
#: more slowly than this budget allows (docs/results.md).
SINGLE_OBJECT_TYPES = ("color", "shape", "direction")


def demo_data_config(frames: int = 8, seed: int = 0) -> MovingShapesConfig:
    """The MovingShapes settings of the demo: 32-px frames, 1–2 objects, colour/shape/direction about a lone one."""
    return MovingShapesConfig(num_frames=frames, seed=seed, single_object_types=SINGLE_OBJECT_TYPES)


def build_small_llm(vocab_size: int, seed: int):
    """A ~1M-parameter Llama-style LM built from its config (random weights)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def build_small_vision(image_size: int, seed: int):
    """A small random CLIP vision tower built from its config (kept for notebooks; the demo no longer uses it).

    Its features lose most of what MovingShapes asks about (see docs/results.md); the demo uses
    :class:`~video2param.data.front_end.ObjectGridFrontEnd` instead.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(image_size=image_size, patch_size=8, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4)
    return CLIPVisionModel(config).eval()


def demo_front_end(image_size: int) -> ObjectGridFrontEnd:
    """The demo's default vision front end (see :mod:`video2param.data.front_end`): a 2 × 2 grid, 4 tokens per
    frame (a 4 × 4 grid costs 4× the LLM tokens for the same information: every object is one token either way)."""
    from .data.front_end import ObjectGridConfig

    return ObjectGridFrontEnd(ObjectGridConfig(image_size=image_size))


@dataclass
class DemoData:
    """The demo's data for one seed as `video2param demo` prepares it (front end, training-set standardisation)."""

    config: MovingShapesConfig
    tokenizer: Any
    encoder: Any
    train_set: list
    test_set: list
    train_feats: list = field(metadata={"help": "standardised features of the training questions"})
    test_feats: list = field(metadata={"help": "standardised features of the held-out questions"})
    train_raw: list = field(metadata={"help": "the same training items before standardisation (aligner targets)"})
    test_raw: list = field(metadata={"help": "the same held-out items before standardisation"})


def demo_data(frames: int = 8, seed: int = 0, train_size: int = 3000, test_size: int = 500) -> DemoData:
    """Splits, tokenizer and object-grid features of the demo, raw and standardised (no progress bars), for scripts
    that train or inspect one method the way the demo does."""
    data_cfg = demo_data_config(frames, seed)
    train_set, test_set = make_splits(data_cfg, train_size, test_size)
    encoder = demo_front_end(data_cfg.frame_size).vision_encoder(chunk_size=1024, progress=False)
    train_raw = encode_dataset(train_set, encoder, progress=False)
    test_raw = encode_dataset(test_set, encoder, progress=False)
    train_feats, test_feats = list(train_raw), list(test_raw)  # standardised below, item by item
    standardize_items(FeatureStandardizer.fit([item.video for item in train_feats]), train_feats, test_feats)
    return DemoData(data_cfg, moving_shapes_tokenizer(data_cfg), encoder, train_set, test_set, train_feats,
                    test_feats, train_raw, test_raw)


def methods_to_run(method: str) -> list[str]:
    """The baseline first, then ``method`` (or every registered method for ``all``)."""
    from .methods.base import available_methods

    chosen = available_methods() if method == ALL_METHODS else [method]
    return [BASELINE] + [m for m in chosen if m != BASELINE]


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo (see the module docstring); returns what it writes to ``results.json``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    data_cfg = demo_data_config(cfg.frames, cfg.seed)
    methods = methods_to_run(cfg.method)
    train_set, test_set = make_splits(data_cfg, cfg.train_size, cfg.test_size)
    tokenizer, make_llm = _language_model(cfg, data_cfg)

    log(f"MovingShapes: {len(train_set)} train / {len(test_set)} held-out questions, {cfg.frames} frames of "
        f"{data_cfg.frame_size}px; methods: {', '.join(methods)}; {cfg.steps} steps each, times a method's step_factor")
    encoder, front_end = _vision(cfg, data_cfg)
    train_raw = encode_dataset(train_set, encoder, progress=cfg.progress, description="encoding train videos")
    test_raw = encode_dataset(test_set, encoder, progress=cfg.progress, description="encoding test videos")
    train_feats, test_feats = list(train_raw), list(test_raw)  # standardised below; the raw ones feed the aligner
    standardizer = FeatureStandardizer.fit([item.video for item in train_feats])
    standardize_items(standardizer, train_feats, test_feats)
    vision_dir = save_vision(out_dir / "vision", standardizer, front_end=front_end,
                             tower=None if front_end is not None else cfg.vision)
    log(f"  features {tuple(train_feats[0].video.shape)} per video (frames, tokens, width) "
        f"in {time.perf_counter() - t0:.1f}s")

    @functools.cache
    def text_tower():
        # Built once, on first need: PPLLaVA's relevance map needs a text tower aligned to the front end.
        return _aligned_text_tower(cfg, data_cfg, (train_feats, train_raw), (test_feats, test_raw), out_dir, log)

    rows: dict[str, dict[str, Any]] = {}
    costs: dict[str, CostReport] = {}
    failed: dict[str, str] = {}
    for name in methods:
        try:
            rows[name], costs[name] = _train_and_score(name, cfg, tokenizer, make_llm, encoder.hidden_size,
                                                       train_feats, test_feats, out_dir, log, text_tower)
        except Exception as err:  # noqa: BLE001 - with --method all one broken method must not sink the others
            if name == BASELINE or cfg.method != ALL_METHODS:
                raise
            failed[name] = f"{type(err).__name__}: {err}"
            log(f"  {name} failed: {failed[name]}\n{traceback.format_exc(limit=3)}")
    for name in rows:
        rows[name].update(costs[name].ratios(costs[BASELINE]))
        rows[name]["train_step_ratio"] = rows[name]["train_step_s"] / rows[BASELINE]["train_step_s"]
    chance = chance_accuracy(data_cfg)
    table = format_table(rows, list(rows), chance)
    log("\n" + table + "\n\n" + TABLE_NOTE)
    for name, error in failed.items():
        log(f"  {name}: not in the table, it failed: {error}")

    example = _ask_example(rows, test_set, out_dir, vision_dir, log)
    summary = {"config": dataclasses.asdict(cfg), "data": dataclasses.asdict(data_cfg), "chance": chance,
               "rows": rows, "failed": failed, "table": table, "ask": example,
               "seconds": time.perf_counter() - t0}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"\ntotal {summary['seconds']:.0f}s; results in {out_dir / 'results.json'}")
    return summary


def _language_model(cfg: DemoConfig, data_cfg: MovingShapesConfig):
    """The tokenizer and a factory of fresh, identically initialised LMs."""
    if cfg.llm:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.llm)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

        def make_llm():
            torch.manual_seed(cfg.seed)
            return AutoModelForCausalLM.from_pretrained(cfg.llm)

        return tokenizer, make_llm
    tokenizer = moving_shapes_tokenizer(data_cfg)
    # Fixed now: wrap_model adds the video token to this tokenizer, and a vocabulary one row larger would give the
    # methods trained after the first a differently initialised LM.
    vocab_size = len(tokenizer) + 1  # +1: the video token
    return tokenizer, lambda: build_small_llm(vocab_size, cfg.seed)


def _vision(cfg: DemoConfig, data_cfg: MovingShapesConfig):
    """(VisionEncoder, the demo front end or None when ``--vision`` names a tower)."""
    from .video.encoder import VisionEncoder

    if cfg.vision:
        return VisionEncoder.from_pretrained(cfg.vision, chunk_size=256, progress=False), None
    front_end = demo_front_end(data_cfg.frame_size)
    return front_end.vision_encoder(chunk_size=1024, progress=False), front_end


def _aligned_text_tower(cfg: DemoConfig, data_cfg: MovingShapesConfig, train: tuple[list, list],
                        held_out: tuple[list, list], out_dir: Path, log):
    """The demo's dual encoder: a small CLIP text tower aligned to the front end on the training split (cached
    under ``<output_dir>/aligner``; see :mod:`video2param.data.text_alignment`)."""
    from .data.text_alignment import AlignerSettings, load_or_align

    if cfg.vision:
        raise ValueError("a method that reads the question with a text tower needs the dual encoder that made the "
                         f"features; --vision {cfg.vision} is a vision tower alone. Run it with its own script "
                         "(benchmarks/ppllava_movingshapes.py) or without --vision")
    with hf_progress_bars_off():
        dual, quality = load_or_align(out_dir / "aligner", moving_shapes_tokenizer(data_cfg), train, held_out,
                                      data_cfg.colors, AlignerSettings(), log, frames=cfg.frames,
                                      train_size=cfg.train_size, test_size=cfg.test_size, seed=cfg.seed)
    log(f"  aligned text tower: on held-out questions the relevance map puts {100 * quality['target_mass']:.0f}% of "
        f"its mass on the named object's tokens (uniform: {100 * quality['uniform_target_mass']:.0f}%)")
    return dual


def _train_and_score(name: str, cfg: DemoConfig, tokenizer, make_llm, vision_width: int, train_feats, test_feats,
                     out_dir: Path, log, text_tower: Callable[[], Any]) -> tuple[dict[str, Any], CostReport]:
    """Train one method from the common starting point, score it, measure its costs, save it for ``ask``."""
    from .methods.base import get_method

    settings = method_settings(name, cfg.frames)
    lr = cfg.lr if cfg.lr is not None else settings.lr
    needs = get_method(name).needs
    text_encoder = text_tower() if "text_encoder" in needs else None
    stage, teacher, llm = cfg.stage, None, None
    if "teacher" in needs:
        # A method that learns from a token adapter reading the video (Video2LoRA) starts where the paper does:
        # the trained baseline (its LM and adapter, frozen) is the teacher; only the method's own modules train.
        stage, teacher = "pretrain", str((out_dir / BASELINE / "adapter").resolve())
        with hf_progress_bars_off():
            from transformers import AutoModelForCausalLM

            llm = AutoModelForCausalLM.from_pretrained(out_dir / BASELINE / "llm")
    steps = settings.steps(cfg.steps)
    log(f"\n== {name}: {steps} steps, batch {cfg.batch_size}, lr {lr:g}, stage {stage}"
        + (f", teacher: the trained {BASELINE}" if teacher else "") + " ==")
    torch.manual_seed(cfg.seed)
    config = VideoAdapterConfig(method=name, vision_hidden_size=vision_width, **method_options(name, cfg.frames))
    vm = wrap_model(llm if llm is not None else make_llm(), config, tokenizer=tokenizer, stage=stage,
                    teacher=teacher, text_encoder=text_encoder)
    collate = VideoQACollator(tokenizer, vm.video_token, train=True)
    recipe = TrainConfig(steps=steps, batch_size=cfg.batch_size, lr=lr, seed=cfg.seed,
                         log_every=max(steps // 4, 1), progress=cfg.progress, description=f"training {name}")
    result = fit(vm, train_feats, collate, recipe, settings.kl_weight, log)
    acc = evaluate(vm, test_feats, batch_size=100, progress=cfg.progress)
    cost = _costs(vm, tokenizer, test_feats)
    method_dir = out_dir / name
    vm.save_pretrained(method_dir / "adapter", metrics=dict(acc))
    with hf_progress_bars_off():
        vm.save_base_model(method_dir / "llm")  # stage sft trains the LM too: ask needs these weights
    tokenizer.save_pretrained(method_dir / "llm")
    log(f"  accuracy {json.dumps({k: round(100 * v, 1) for k, v in acc.items()})}; "
        f"{result.seconds:.0f}s of training; saved to {method_dir}/")
    row = {"accuracy": acc, "lr": lr, "steps": steps, "stage": stage, "teacher": teacher,
           "train_step_s": result.step_time, "train_seconds": result.seconds, "final_loss": result.final_loss(),
           "visual_tokens": cost.visual_tokens, "llm_flops": cost.llm_flops, "ttft_s": cost.ttft_s}
    return row, cost


def fit(vm: VideoModel, dataset, collate, recipe: TrainConfig, kl_weight: float | None = None,
        log: Callable[[str], None] = print):
    """Train ``vm`` as the demo does: ``train`` on the answers, or with a positive ``kl_weight`` (a method with a
    teacher) ``distill`` on the same schedule (no weight decay, the same warm-up) plus that weight on the KL term."""
    if not kl_weight:
        return train(vm, dataset, collate, recipe, log=log)
    from .distill import DistillConfig, distill

    return distill(vm, dataset, collate, DistillConfig(
        steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, weight_decay=recipe.weight_decay,
        warmup_ratio=min(1.0, recipe.warmup / recipe.steps), grad_clip=recipe.grad_clip, kl_weight=kl_weight,
        seed=recipe.seed, log_every=recipe.log_every, progress=recipe.progress, description=recipe.description),
        log=log)


def _costs(vm: VideoModel, tokenizer, items) -> CostReport:
    collate = VideoQACollator(tokenizer, vm.video_token, train=False)
    batch = collate(items[:1])
    return measure_costs(vm, batch["input_ids"], batch["attention_mask"], batch["videos"], repeats=20)


TABLE_NOTE = (
    "Accuracy in % on the held-out questions; chance = the best guess from the question alone (answers are "
    "balanced).\nLLM FLOPs are counted with attention; TTFT = time to the first answer token with the video "
    "encoded beforehand.\nOn this ~1M-parameter LM a generate() call spends ~10 ms in fixed overhead whatever the "
    "prompt length, and\nweight-space methods add per-layer hook calls, so the TTFT and train-step ratios say little "
    "about larger LMs:\nbenchmarks/method_costs.py measures them on larger ones (docs/results.md)."
)


def format_table(rows: dict[str, dict[str, Any]], methods: list[str], chance: dict[str, float] | None = None) -> str:
    """The demo's markdown table: a chance row, then accuracy per question type and the cost ratios per method."""
    keys = [k for k in next(iter(rows.values()))["accuracy"] if k != "overall"] + ["overall"]
    head = ["method", *keys, "visual tokens", f"LLM FLOPs/answer (× {BASELINE})", f"TTFT (× {BASELINE})",
            f"train step (× {BASELINE})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if chance is not None:
        cells = ["chance", *[f"{100 * chance[k]:.1f}" if k in chance else "" for k in keys], "", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    for name in methods:
        r = rows[name]
        acc = r["accuracy"]
        label = f"{name} (baseline)" if name == BASELINE else name
        cells = [label, *[f"{100 * acc[k]:.1f}" for k in keys], str(r["visual_tokens"]), f"{r['flops_ratio']:.3f}",
                 f"{r['ttft_ratio']:.2f}", f"{r['train_step_ratio']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ask_example(rows: dict[str, dict[str, Any]], test_set, out_dir: Path, vision_dir: Path, log,
                 tries: int = 20) -> dict[str, Any]:
    """Write a held-out video as an MP4, answer its question from the saved files, print the `ask` command.

    Uses the method with the best overall accuracy among those ``ask`` can load from its files alone. Candidates
    are the held-out temporal questions in order (direction first); the first one the saved adapter, LM and front
    end answer right from the MP4 is shown (the number tried is reported); if none of ``tries`` is, the first is
    shown with the wrong answer.
    """
    from .ask import Asker
    from .data.video_file import write_mp4
    from .methods.base import get_method

    # `ask` loads an adapter, an LM and the vision front end; a method that also needs a text tower or a teacher
    # at question time cannot be asked from those files alone.
    askable = [m for m in rows if not {"text_encoder", "teacher"} & set(get_method(m).needs)]
    method = max(askable, key=lambda m: (rows[m]["accuracy"]["overall"], m != BASELINE))
    files = {"adapter": str(out_dir / method / "adapter"), "llm": str(out_dir / method / "llm"),
             "vision": str(vision_dir)}
    asker = Asker(**files)
    rank = {"direction": 0, "order": 1, "count": 2}
    candidates = sorted((i for i in range(len(test_set)) if test_set[i].qtype in rank),
                        key=lambda i: (rank[test_set[i].qtype], i))[:tries]
    shown = None
    for tried, index in enumerate(candidates, start=1):
        item = test_set[index]
        video = out_dir / "videos" / f"heldout-{index:04d}.mp4"
        write_mp4(video, item.video)
        answer = asker(video, item.question, max_new_tokens=2)
        correct = answer.split()[:1] == [item.answer]
        if shown is None or correct:
            if shown is not None:
                Path(shown["video"]).unlink()
            shown = {"method": method, "video": str(video), "question": item.question, "expected": item.answer,
                     "answer": answer, "correct": correct, "tried": tried}
        else:
            video.unlink()
        if correct:
            break
    assert shown is not None, "the held-out split has no temporal question"
    shown["command"] = shlex.join(["video2param", "ask", shown["video"], shown["question"], "--adapter",
                                   files["adapter"], "--llm", files["llm"], "--vision", files["vision"],
                                   "--max-new-tokens", "2"])
    verdict = (f"it answers {shown['answer']!r}, the truth is {shown['expected']!r}" if not shown["correct"] else
               f"it answers {shown['answer']!r}, which is right; the first correct of {shown['tried']} tried")
    log(f"\nAsk the trained {method} about a held-out video, saved as an MP4 ({verdict}):\n  {shown['command']}")
    return shown
