"""The README.md model card written next to a saved adapter."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import VideoModel


def render_model_card(vm: "VideoModel", metrics: dict[str, float] | None = None) -> str:
    """A short, honest card: method, base model, vision tower, frames, metrics when given, how to load."""
    from . import __version__
    from .model import _vision_name

    cfg = vm.config
    fp = vm.fingerprint
    base = fp.name or f"a {fp.model_type} model (hidden {fp.hidden_size}, {fp.num_layers} layers)"
    vision = _vision_name(vm.vision) or "not recorded (features were given directly)"
    lines = [
        "---",
        "library_name: video2param",
        "tags:",
        "- video2param",
        f"- {cfg.method}",
        "- video-text-to-text",
        "---",
        "",
        f"# {cfg.method} video adapter",
        "",
        f"A [video2param](https://pypi.org/project/video2param/) `{cfg.method}` adapter that lets a causal LM answer "
        "questions about videos.",
        "",
        "| | |",
        "|---|---|",
        f"| method | `{cfg.method}` ({type(vm.method).kind} path) |",
        f"| base model | {base} (`{fp.model_type}`, vocab {fp.vocab_size}) |",
        f"| vision tower | {vision} |",
        f"| frames | {cfg.num_frames} |",
        f"| vision width Dv | {cfg.vision_hidden_size} |",
        f"| adapter parameters | {sum(p.numel() for p in vm.method.parameters()):,} |",
        f"| video2param version | {__version__} |",
    ]
    if type(vm.method).kind == "weights":
        lines.append(f"| rank / alpha | {cfg.rank} / {cfg.alpha:g} |")
        lines.append(f"| targets | {', '.join(cfg.targets)} on layers {sorted({s.layer for s in vm.llm_info.sites})} |")
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())]
    lines += ["", "## How to load", "", *_loading_snippet(fp.name, _vision_name(vm.vision)), "",
              "Only JSON and safetensors files are read; nothing in this repository is executed.", ""]
    return "\n".join(lines)


def _loading_snippet(base_name: str | None, vision_name: str | None) -> list[str]:
    """Runnable code when the base model and vision tower names are known, placeholders where they are not."""
    base = base_name or "<base model>"
    lines = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer"]
    lines.append("from video2param import VideoModel" + (", VisionEncoder" if vision_name else ""))
    lines += ["", f'llm = AutoModelForCausalLM.from_pretrained("{base}")',
              f'tok = AutoTokenizer.from_pretrained("{base}")']
    if vision_name:
        lines += [f'vision = VisionEncoder.from_pretrained("{vision_name}")',
                  'vm = VideoModel.from_pretrained(llm, "<this repo or directory>", tokenizer=tok, vision=vision)']
    else:
        lines += ["# trained on precomputed features: pass videos=features (B, T, P, Dv), or vision=<your tower>",
                  'vm = VideoModel.from_pretrained(llm, "<this repo or directory>", tokenizer=tok)']
    lines.append("```")
    return lines
