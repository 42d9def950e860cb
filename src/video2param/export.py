"""Export one video's weight deltas as a standard PEFT LoRA adapter.

A weight-space method (e.g. ViPE) turns a video into low-rank deltas ``scale · B A`` on target modules of the
LLM. :func:`export_peft` writes those deltas for ONE video as the two files every PEFT-compatible stack reads:

* ``adapter_config.json``: ``peft_type`` LORA, ``task_type`` CAUSAL_LM, the exact target module names, ``r`` and
  ``lora_alpha`` (equal, so PEFT's scaling ``lora_alpha / r`` is exactly 1: the video's scale is folded into B),
  ``fan_in_fan_out`` for GPT-2 style ``Conv1D`` weights;
* ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` (r, d_in) and ``.lora_B.weight``
  (d_out, r) per target module, the key layout ``PeftModel.save_pretrained`` writes.

``PeftModel.from_pretrained(base_llm, directory)`` then reproduces the video-conditioned model on text-only input.

A fused projection (Phi-3 ``qkv_proj``, GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``, ``gate_up_proj``) carries
one delta per role; PEFT knows only whole modules, so the roles become ONE LoRA on the module whose rank is the sum
of the roles' ranks: A stacks the roles' A factors, B is block-structured, each role's B placed on that role's output
features (zero elsewhere) with ``TargetSite.embed_out``. Then ``B A = Σ_role embed_out(scale · B_role A_role)``,
exactly the sum of the role deltas.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file

from .methods.base import LLMInfo, TokenContext, WeightContext
from .serialization import BaseModelFingerprint, save_file_pair
from .targets import TargetSite, layer_of

__all__ = [
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "ModuleLoRA",
    "VideoModelLike",
    "export_peft",
    "module_loras",
    "peft_lora_config",
    "write_peft_lora",
]

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
_CARD_NAME = "README.md"
# PeftModelForCausalLM wraps the base model twice (PeftModel.base_model = LoraModel, LoraModel.model = the LLM);
# saved keys carry that prefix with the adapter name removed.
_KEY_PREFIX = "base_model.model."


class VideoModelLike(Protocol):
    """What `export_peft` uses of a ``VideoModel`` (any object with these attributes works)."""

    config: Any  # .method (the method's name)
    llm_info: LLMInfo  # .sites: the target sites of the LLM
    method_kind: str
    fingerprint: BaseModelFingerprint

    def encode_video(self, videos: Any, frame_mask: torch.Tensor | None = None) -> Any: ...


@dataclass(frozen=True)
class ModuleLoRA:
    """The LoRA of one whole module: ``delta_W = B @ A`` in ``nn.Linear`` orientation (out, in), scale included."""

    name: str = field(metadata={"help": "qualified module name in the LLM (what PEFT's target_modules matches)"})
    A: torch.Tensor = field(repr=False, metadata={"help": "(rank, in_features)"})
    B: torch.Tensor = field(repr=False, metadata={"help": "(module out_features, rank), the delta's scale folded in"})
    transposed: bool = field(metadata={"help": "the module is a GPT-2 Conv1D (weight stored (in, out))"})
    parts: tuple[str, ...] = field(metadata={"help": "site keys combined into this LoRA, in rank order"})

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta_weight(self) -> torch.Tensor:
        """The dense (out_features, in_features) delta this LoRA adds to the module's weight (Linear layout)."""
        return self.B.float() @ self.A.float()


def module_loras(context: WeightContext, sites: Sequence[TargetSite], sample: int = 0) -> dict[str, ModuleLoRA]:
    """One :class:`ModuleLoRA` per target module for video ``sample`` of ``context``, keyed by module name.

    Sites without a delta in ``context`` are skipped; the roles of a fused module are combined (see module doc).
    Computed in float32 on the CPU.

    Raises:
        ValueError: ``context`` holds a delta for a key that is not one of ``sites``, ``sample`` is out of range,
            or factors do not match their site's widths.
    """
    by_key = {site.key: site for site in sites}
    unknown = sorted(set(context.deltas) - set(by_key))
    if unknown:
        raise ValueError(
            f"export: the context has deltas for {_short(unknown)}, which are not targets of this model "
            f"(targets: {_short(sorted(by_key))}); was it encoded by another model?"
        )
    if not 0 <= sample < context.batch_size:
        raise ValueError(f"export: sample {sample} out of range for a context of {context.batch_size} video(s)")
    grouped: dict[str, list[TargetSite]] = {}
    for site in sites:
        if site.key in context.deltas:
            grouped.setdefault(site.name, []).append(site)
    out: dict[str, ModuleLoRA] = {}
    for name, module_sites in grouped.items():
        a_parts, b_parts = [], []
        for site in module_sites:
            factors = context.deltas[site.key]
            A = factors.A[sample].detach().to("cpu", torch.float32)  # (r, d_in)
            B = factors.B[0 if factors.B.shape[0] == 1 else sample].detach().to("cpu", torch.float32)  # (d_out, r)
            if A.shape[1] != site.in_features:
                raise ValueError(f"export: {site.key}: A has input width {A.shape[1]}, the module takes "
                                 f"{site.in_features}")
            if B.shape[0] != site.out_features:
                raise ValueError(f"export: {site.key}: B has output width {B.shape[0]}, the site has "
                                 f"{site.out_features} output features")
            a_parts.append(A)
            # Scale folded into B so the exported LoRA needs PEFT scaling 1; zero rows outside this role's features.
            b_parts.append(site.embed_out(B * float(factors.scale), dim=0))
        A_all, B_all = torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)
        if not (torch.isfinite(A_all).all() and torch.isfinite(B_all).all()):
            raise ValueError(f"export: the delta of {name} contains NaN or inf")
        out[name] = ModuleLoRA(name=name, A=A_all, B=B_all, transposed=module_sites[0].transposed,
                               parts=tuple(s.key for s in module_sites))
    return out


def export_peft(vm: VideoModelLike, video: Any, directory: str | Path, *, frame_mask: torch.Tensor | None = None,
                uniform_rank: bool = True, dtype: torch.dtype = torch.float32,
                base_model_name_or_path: str | None = None) -> Path:
    """Write one video's weight deltas as a PEFT LoRA adapter directory; returns the directory.

    Args:
        vm: a ``VideoModel`` with a weight-space method (e.g. ``vipe``), or any object with its ``config``,
            ``llm_info``, ``method_kind``, ``fingerprint`` and ``encode_video`` (`VideoModelLike`).
        video: ONE video in any form ``vm.encode_video`` accepts (features (1, T, P, Dv), pixel frames with a vision
            tower, a file path, a clip), or a ready ``WeightContext`` of batch 1 (e.g. encoded with a prompt for a
            method that conditions on it).
        directory: where to write (created if needed). Only the LoRA's own files are replaced, each atomically;
            other files in the directory are left alone (see `write_peft_lora`).
        frame_mask: (1, T) mask of real frames, as for ``encode_video``.
        uniform_rank: True (default): every module gets the same rank (the largest; smaller LoRAs are padded with
            zero rows, which changes nothing), the plainest form, which LoRA servers (vLLM, TGI, ...) read.
            False: each module keeps its own rank through ``rank_pattern``/``alpha_pattern`` (smaller file that
            PEFT loads; not every server honours the patterns).
        dtype: dtype of the stored tensors (float32 by default: exact; bfloat16/float16 halve the file).
        base_model_name_or_path: recorded in the config (default: the LLM's ``name_or_path`` when known).

    Raises:
        ValueError: a token-space method or context, more than one video, a context that does not fit the model,
            or a non-finite delta.
        OSError: a file cannot be written (the message names it).
    """
    context = _one_video_context(vm, video, frame_mask)
    sites = vm.llm_info.sites
    loras = module_loras(context, sites)
    layers = {s.layer for s in sites if s.name in loras}
    llm = getattr(vm, "llm", None)
    if llm is not None:
        # A LoRA trained on the LLM beside the video adapter is part of what answers: without it the PEFT model
        # would give other logits. It goes in along the rank axis.
        loras = _with_llm_lora(loras, llm)
        layers |= {layer_of(llm, name) for name in loras} - {None}
    return write_peft_lora(loras, directory, method=vm.config.method, fingerprint=vm.fingerprint, layers=layers,
                           uniform_rank=uniform_rank, dtype=dtype, base_model_name_or_path=base_model_name_or_path)


def _with_llm_lora(loras: dict[str, ModuleLoRA], llm: Any) -> dict[str, ModuleLoRA]:
    """``loras`` with the LLM's own LoRA (``llm_lora``) appended along the rank axis, module by module."""
    from .llm_lora import llm_lora_factors

    out = dict(loras)
    for name, (A, B, transposed) in llm_lora_factors(llm).items():
        video = out.get(name)
        if video is None:
            out[name] = ModuleLoRA(name=name, A=A, B=B, transposed=transposed, parts=("llm_lora",))
        else:
            out[name] = ModuleLoRA(name=name, A=torch.cat([video.A, A]), B=torch.cat([video.B, B], dim=1),
                                   transposed=video.transposed, parts=(*video.parts, "llm_lora"))
    return out


def write_peft_lora(loras: dict[str, ModuleLoRA], directory: str | Path, *, method: str,
                    fingerprint: BaseModelFingerprint, layers: Iterable[int], uniform_rank: bool = True,
                    dtype: torch.dtype = torch.float32, base_model_name_or_path: str | None = None) -> Path:
    """Write module LoRAs as a PEFT adapter directory (``adapter_config.json``, ``adapter_model.safetensors``,
    ``README.md``); returns the directory.

    The weights and the config are replaced as a pair (`video2param.serialization.save_file_pair`): each file
    atomically, weights first, then the config, with a journal that lets the next export finish one that was
    killed between the two. Other files in `directory` are never touched; a ``README.md`` not written by
    video2param is kept.
    """
    if not loras:
        raise ValueError("export: no module has a delta; there is nothing to export")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"export: dtype must be a floating torch.dtype, got {dtype!r}")
    ranks = {name: lora.rank for name, lora in loras.items()}
    r = max(ranks.values())
    tensors: dict[str, torch.Tensor] = {}
    for name, lora in loras.items():
        A, B = lora.A, lora.B
        if uniform_rank and lora.rank < r:
            A = torch.cat([A, A.new_zeros(r - lora.rank, A.shape[1])], dim=0)
            B = torch.cat([B, B.new_zeros(B.shape[0], r - lora.rank)], dim=1)
        tensors[f"{_KEY_PREFIX}{name}.lora_A.weight"] = A.to(dtype).contiguous()
        tensors[f"{_KEY_PREFIX}{name}.lora_B.weight"] = B.to(dtype).contiguous()
    base_name = base_model_name_or_path if base_model_name_or_path is not None else fingerprint.name
    config = peft_lora_config(
        modules=sorted(loras), r=r, rank_pattern={} if uniform_rank else ranks,
        fan_in_fan_out=all(lora.transposed for lora in loras.values()), base_model_name_or_path=base_name,
    )
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")

    def write_weights(path: Path) -> None:
        save_file(tensors, os.fspath(path), metadata={"format": "pt", "library": "video2param", "method": method})

    card = _render_card(method, fingerprint, loras, sorted(set(layers)), r, uniform_rank, base_name)
    return save_file_pair(directory, weights_name=PEFT_WEIGHTS_NAME, write_weights=write_weights,
                          config_name=PEFT_CONFIG_NAME, make_config=lambda _digest: config_bytes, card=card)


def peft_lora_config(modules: Iterable[str], r: int, *, rank_pattern: dict[str, int] | None = None,
                     fan_in_fan_out: bool = False, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` of a LoRA whose effective scaling is 1 on every module.

    Only long-standing LoRA fields are written, so old and new PEFT versions (and servers that parse the file
    themselves) read it alike; PEFT fills every other field with its default. ``rank_pattern`` maps module names
    to ranks different from ``r``; each gets the same ``lora_alpha`` so that ``alpha / r`` stays 1.
    """
    # PEFT matches pattern keys as regexes against the end of a module name: escape the dots of exact names.
    patterns = {re.escape(name): rank for name, rank in sorted((rank_pattern or {}).items()) if rank != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "target_modules": list(modules),
        "rank_pattern": patterns,
        "alpha_pattern": dict(patterns),
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "init_lora_weights": True,
    }


def _one_video_context(vm: VideoModelLike, video: Any, frame_mask: torch.Tensor | None) -> WeightContext:
    if vm.method_kind != "weights":
        raise ValueError(
            f"export_peft: method {vm.config.method!r} puts the video into input tokens, not weights; only "
            "weight-space methods (e.g. 'vipe') can be exported as a LoRA"
        )
    if isinstance(video, TokenContext):
        raise ValueError("export_peft: got a TokenContext; a LoRA can only be made from a WeightContext")
    if isinstance(video, WeightContext):
        if frame_mask is not None:
            raise ValueError("export_peft: frame_mask applies to raw videos, not to a ready WeightContext")
        context = video
    else:
        with torch.no_grad():
            context = vm.encode_video(video, frame_mask)
    if context.batch_size != 1:
        raise ValueError(
            f"export_peft: a LoRA holds one video's deltas, got {context.batch_size} videos; export them one at a "
            "time (e.g. context.select([i]))"
        )
    return context


def _render_card(method: str, fp: BaseModelFingerprint, loras: dict[str, ModuleLoRA], layers: list[int], r: int,
                 uniform_rank: bool, base_name: str | None) -> str:
    from . import __version__

    base = base_name or f"a {fp.model_type} model (hidden {fp.hidden_size}, {fp.num_layers} layers)"
    smallest = min(lora.rank for lora in loras.values())
    rank_note = f"{r} on every module" if uniform_rank else f"{smallest}–{r} per module"
    return "\n".join([
        "---",
        "library_name: peft",
        "tags:",
        "- lora",
        "- video2param",
        f"- {method}",
        "---",
        "",
        "# LoRA of one video",
        "",
        f"The weight deltas that the video2param `{method}` adapter computed for one video, exported as a "
        "standard PEFT LoRA. With it, the base model answers questions about that video from text alone.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {base} (`{fp.model_type}`, vocab {fp.vocab_size}) |",
        f"| modules | {len(loras)} on layers {layers} |",
        f"| rank | {rank_note} (scale folded into lora_B; lora_alpha = r) |",
        f"| video2param version | {__version__} |",
        "",
        "## How to load",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base_name or '<base model>')})",
        'model = PeftModel.from_pretrained(base, "<this repo or directory>")',
        "```",
        "",
    ])


def _short(items: list[str], limit: int = 4) -> str:
    head = ", ".join(items[:limit])
    return head + (f" (+{len(items) - limit} more)" if len(items) > limit else "")
