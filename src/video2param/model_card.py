"""The README.md model card written next to a saved adapter.

Takes plain data (the config, the base-model fingerprint, counts and names), so it depends on no model class.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import VideoAdapterConfig
    from .serialization import BaseModelFingerprint


def render_model_card(config: "VideoAdapterConfig", fingerprint: "BaseModelFingerprint", *, method_kind: str,
                      num_parameters: int, vision_name: str | None = None, injected_layers: Iterable[int] = (),
                      metrics: Mapping[str, float] | None = None) -> str:
    """A short, honest card: method, base model, vision tower, frames, metrics when given, how to load.

    Args:
        config: the adapter's config.
        fingerprint: the base model it was trained on (its ``name`` makes the loading code runnable).
        method_kind: ``"tokens"`` or ``"weights"`` (the method's path into the LLM).
        num_parameters: the adapter's parameter count.
        vision_name: the vision tower's name or path, when known.
        injected_layers: decoder layers that receive deltas (weight methods).
        metrics: shown in a table when given.
    """
    from . import __version__

    fp = fingerprint
    base = fp.name or f"a {fp.model_type} model (hidden {fp.hidden_size}, {fp.num_layers} layers)"
    vision = vision_name or "not recorded (features were given directly)"
    lines = [
        "---",
        "library_name: video2param",
        "tags:",
        "- video2param",
        f"- {config.method}",
        "- video-text-to-text",
        "---",
        "",
        f"# {config.method} video adapter",
        "",
        f"A [video2param](https://pypi.org/project/video2param/) `{config.method}` adapter that lets a causal LM "
        "answer questions about videos.",
        "",
        "| | |",
        "|---|---|",
        f"| method | `{config.method}` ({method_kind} path) |",
        f"| base model | {base} (`{fp.model_type}`, vocab {fp.vocab_size}) |",
        f"| vision tower | {vision} |",
        f"| frames | {config.num_frames} |",
        f"| vision width Dv | {config.vision_hidden_size} |",
        f"| adapter parameters | {num_parameters:,} |",
        f"| video2param version | {__version__} |",
    ]
    if method_kind == "weights":
        lines.append(f"| rank / alpha | {config.rank} / {config.alpha:g} |")
        lines.append(f"| targets | {', '.join(config.targets)} on layers {sorted(set(injected_layers))} |")
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_format_metric(v)} |" for k, v in sorted(metrics.items())]
    lines += ["", "## How to load", "", *_loading_snippet(fp.name, vision_name), "",
              "Only JSON and safetensors files are read; nothing in this repository is executed.", ""]
    return "\n".join(lines)


def _format_metric(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _loading_snippet(base_name: str | None, vision_name: str | None) -> list[str]:
    """Runnable code when the base model and vision tower names are known, placeholders where they are not."""
    base = json.dumps(base_name or "<base model>")  # a quoted Python string literal, whatever the name holds
    lines = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer"]
    lines.append("from video2param import VideoModel" + (", VisionEncoder" if vision_name else ""))
    lines += ["", f"llm = AutoModelForCausalLM.from_pretrained({base})",
              f"tok = AutoTokenizer.from_pretrained({base})"]
    if vision_name:
        lines += [f"vision = VisionEncoder.from_pretrained({json.dumps(vision_name)})",
                  'vm = VideoModel.from_pretrained(llm, "<this repo or directory>", tokenizer=tok, vision=vision)']
    else:
        lines += ["# trained on precomputed features: pass videos=features (B, T, P, Dv), or vision=<your tower>",
                  'vm = VideoModel.from_pretrained(llm, "<this repo or directory>", tokenizer=tok)']
    lines.append("```")
    return lines
