"""Where video enters a HuggingFace causal LM: decoder layers, embeddings, and role → projection sites.

This is the one module that knows HF architectures. Everything else speaks in *roles*:

======  =====================================================================================================
role    projections
======  =====================================================================================================
``q``   attention query projection (``q_proj``; q slice of a fused ``qkv_proj`` / ``c_attn`` / ``query_key_value``)
``k``   attention key projection
``v``   attention value projection
``o``   attention output projection (``o_proj``, ``out_proj``, ``dense``, GPT-2 ``c_proj``)
``mlp`` every linear of the MLP block: gate/up/down, fc1/fc2, c_fc/c_proj, dense_h_to_4h/dense_4h_to_h,
        the gate and up halves of a fused ``gate_up_proj`` ...
======  =====================================================================================================

``q``, ``k``, ``v`` and ``o`` map to exactly one :class:`TargetSite` per layer; ``mlp`` maps to several.

Architecture knowledge is data: :data:`GENERIC_SPEC` lists the conventional attribute names, which already covers
Llama, Qwen2/3, Mistral, Gemma 1–3, Phi, OLMo, StableLM, Starcoder2, GPT-J, OPT and most new models;
:data:`ARCH_SPECS` adds the exceptions keyed by ``config.model_type`` (fused projections, whose output layout
cannot be guessed from a name). :func:`register_architecture` extends the table. A model that fits neither raises
:class:`UnsupportedModelError` naming the model class and what was looked for. A fused projection is only ever
split according to an explicit table entry — a wrong guess would silently put q's delta on k.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = [
    "ARCH_SPECS",
    "GENERIC_SPEC",
    "ROLES",
    "ArchSpec",
    "FusedQKV",
    "TargetSite",
    "UnsupportedModelError",
    "arch_spec",
    "decoder_layers",
    "layer_of",
    "find_targets",
    "hidden_size",
    "injection_layers",
    "input_embeddings",
    "num_layers",
    "register_architecture",
]

ROLES: tuple[str, ...] = ("q", "k", "v", "o", "mlp")
"""The roles a projection can play, in canonical order (the order :func:`find_targets` returns them in)."""


class UnsupportedModelError(ValueError):
    """The model's structure is not one :mod:`video2param.targets` knows how to hook."""


# --------------------------------------------------------------------------------------------------------------
# Sites
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetSite:
    """One place where a per-role delta is added: a role's share of one linear layer's output.

    Output addressing. The module's output features (``module_out_features`` of them) are viewed as
    ``(out_groups, module_out_features // out_groups)``; the role owns ``out_slice`` *within every group*.
    Its ``out_features`` features are ordered group-major, which is exactly the order the model's own code sees
    them in after its head split (e.g. ``query_states.flatten(-2)`` before RoPE). Cases:

    * plain projection (``q_proj``, ``down_proj``): ``out_groups == 1``, ``out_slice == slice(0, out_features)``;
    * concatenated fusion (Phi-3 ``qkv_proj`` = ``[q | k | v]``, ``gate_up_proj`` = ``[gate | up]``, GPT-2
      ``c_attn``): ``out_groups == 1`` and a sub-range, e.g. k of Phi-3 is ``slice(n_heads*hd, (n_heads+n_kv)*hd)``;
    * interleaved fusion (GPT-NeoX / Bloom ``query_key_value``, laid out as ``(n_heads, 3, head_dim)``):
      ``out_groups == n_heads`` and q/k/v are ``slice(0, hd)``, ``slice(hd, 2hd)``, ``slice(2hd, 3hd)`` of each
      group; Falcon's grouped-query layout ``(n_kv, n_heads/n_kv + 2, head_dim)`` is the same with
      ``out_groups == n_kv``.

    A delta of shape ``(..., out_features)`` goes to the right output features with :meth:`add_to_output` (or
    :meth:`embed_out`, which zero-pads it to the module's full width); :meth:`select_out` reads a role back out of
    the fused output; :meth:`out_index` gives the same mapping as explicit indices for code that needs them
    (``module_output[..., site.out_index()]`` == ``site.select_out(module_output)``).

    ``transposed`` is True for GPT-2 style :class:`transformers.pytorch_utils.Conv1D`, whose weight is stored as
    ``(in, out)``; the slicing above always refers to *output features*, whatever the storage.
    """

    layer: int = field(metadata={"help": "decoder layer index"})
    role: str = field(metadata={"help": f"one of {ROLES}"})
    name: str = field(metadata={"help": "qualified module name: model.get_submodule(name) is `module`"})
    module: nn.Module = field(repr=False, metadata={"help": "the nn.Linear or transformers Conv1D"})
    # slices are unhashable before Python 3.12; (name, part) already identifies a site, so leave it out of hash
    out_slice: slice = field(hash=False, metadata={"help": "output features of this role within each group"})
    in_features: int = field(metadata={"help": "input width of the module"})
    out_features: int = field(metadata={"help": "number of output features owned by this role (not the module's)"})
    transposed: bool = field(metadata={"help": "weight stored as (in, out) (GPT-2 Conv1D)"})
    out_groups: int = field(default=1, metadata={"help": "groups the module output is viewed as; see class doc"})
    part: str = field(
        default="",
        metadata={"help": "the projection's own name: 'q'/'k'/'v' or 'gate'/'up' for a fused slice, else the "
                          "attribute name ('q_proj', 'fc1', ...)"},
    )

    @property
    def module_out_features(self) -> int:
        """Output width of the whole module (larger than ``out_features`` for a fused projection)."""
        return _dims(self.module)[1]

    @property
    def is_fused(self) -> bool:
        """Whether the role owns only part of the module's output."""
        return self.out_features != self.module_out_features

    @property
    def key(self) -> str:
        """Identifier unique among the sites of one model: ``name``, plus ``:part`` for a fused slice."""
        return f"{self.name}:{self.part}" if self.is_fused else self.name

    def out_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The role's output features as a 1-D LongTensor of indices into the module output, in role order."""
        full = torch.arange(self.module_out_features, device=device)
        return full.view(self.out_groups, -1)[:, self.out_slice].reshape(-1)

    def select_out(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """This role's features of ``t`` (the module's full output width along ``dim``), in role order."""
        if t.shape[dim] != self.module_out_features:
            raise ValueError(
                f"{self.key}: expected the module's {self.module_out_features} output features along dim {dim}, "
                f"got shape {tuple(t.shape)}"
            )
        if not self.is_fused:
            return t
        grouped = t.unflatten(dim, (self.out_groups, -1))
        g = dim % t.ndim  # dim of the group axis; the slot axis follows it
        return grouped.narrow(g + 1, self.out_slice.start, self.out_features // self.out_groups).flatten(g, g + 1)

    def embed_out(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Zero-pad ``t`` (``out_features`` wide along ``dim``) to the module's output width, at this role's features.

        For a weight delta ``dW`` of shape ``(out_features, in_features)``, ``site.embed_out(dW, dim=0)`` is the
        delta of an ``nn.Linear`` weight; transpose it for a ``Conv1D`` (``transposed``).
        """
        if t.shape[dim] != self.out_features:
            raise ValueError(
                f"{self.key}: expected {self.out_features} features along dim {dim}, got shape {tuple(t.shape)}"
            )
        if not self.is_fused:
            return t
        g = dim % t.ndim
        grouped = t.unflatten(g, (self.out_groups, -1))
        # F.pad counts dims from the last one, two entries per dim
        pad = [0, 0] * (grouped.ndim - 1 - (g + 1))
        pad += [self.out_slice.start, self.module_out_features // self.out_groups - self.out_slice.stop]
        return F.pad(grouped, pad).flatten(g, g + 1)

    def add_to_output(self, y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``y`` (module output, ``(..., module_out_features)``) with ``delta`` (``(..., out_features)``) added
        to this role's features. Out of place, differentiable; ``delta`` broadcasts against ``y``."""
        return y + self.embed_out(delta, dim=-1)


# --------------------------------------------------------------------------------------------------------------
# Architecture table
# --------------------------------------------------------------------------------------------------------------


def _all_heads(cfg) -> int:
    return cfg.num_attention_heads


def _kv_heads_from_config(cfg) -> int:
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def _falcon_kv_heads(cfg) -> int:
    # FalconAttention: new architecture → num_kv_heads groups; old one → multi-query (1) or multi-head
    if cfg.new_decoder_architecture:
        return cfg.num_kv_heads
    return 1 if cfg.multi_query else cfg.num_attention_heads


def _bigcode_kv_heads(cfg) -> int:
    return 1 if cfg.multi_query else cfg.num_attention_heads


@dataclass(frozen=True)
class FusedQKV:
    """One projection producing q, k and v, with its output layout.

    ``concat``: ``[q | k | v]`` with widths ``(n_heads, n_kv, n_kv) * head_dim`` (Phi-3, GPT-2).
    ``kv_grouped``: ``n_kv`` groups, each ``[q heads of the group | k | v]`` (GPT-NeoX and Bloom with
    ``n_kv == n_heads``, Falcon, GPT-BigCode); with one kv head both layouts coincide.
    """

    attr: str = field(metadata={"help": "attribute name inside the attention module"})
    layout: Literal["concat", "kv_grouped"] = field(metadata={"help": "output layout, see class doc"})
    kv_heads: Callable = field(
        default=_kv_heads_from_config, metadata={"help": "config → number of key/value heads"}
    )


@dataclass(frozen=True)
class ArchSpec:
    """Where the pieces of a decoder-only LM live. Every field lists candidates, tried in order.

    Paths are dotted attribute paths: ``layers`` from the model, ``attention``/``mlp_block`` from a decoder layer,
    projection names from the attention module or the MLP block (``""`` as an MLP block means the layer itself,
    as in OPT, whose fc1/fc2 sit directly on the layer).
    """

    name: str = field(metadata={"help": "label used in error messages"})
    layers: tuple[str, ...] = field(metadata={"help": "paths of the decoder-layer nn.ModuleList"})
    attention: tuple[str, ...] = field(metadata={"help": "attention submodule of a layer"})
    q: tuple[str, ...] = field(metadata={"help": "separate query projection"})
    k: tuple[str, ...] = field(metadata={"help": "separate key projection"})
    v: tuple[str, ...] = field(metadata={"help": "separate value projection"})
    o: tuple[str, ...] = field(metadata={"help": "output projection"})
    fused_qkv: tuple[FusedQKV, ...] = field(default=(), metadata={"help": "fused q/k/v, tried after separate"})
    mlp_block: tuple[str, ...] = field(default=("mlp",), metadata={"help": "MLP submodule of a layer"})
    mlp: tuple[str, ...] = field(default=(), metadata={"help": "separate MLP linears, in order of application"})
    fused_gate_up: tuple[str, ...] = field(default=(), metadata={"help": "fused [gate | up] projection"})


_LAYER_PATHS = (
    "model.layers",  # Llama, Qwen, Mistral, Gemma, Phi, Phi-3, OLMo, ...
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Bloom, Falcon, GPT-BigCode
    "gpt_neox.layers",
    "model.language_model.layers",  # multimodal wrappers (Gemma3ForConditionalGeneration, Llava, ...)
    "language_model.model.layers",
    "transformer.layers",
    "transformer.blocks",
    "layers",  # base models (LlamaModel, GPTNeoXModel)
    "decoder.layers",  # OPTModel
    "h",  # GPT2Model
)

GENERIC_SPEC = ArchSpec(
    name="generic",
    layers=_LAYER_PATHS,
    attention=("self_attn", "attn", "attention", "self_attention"),
    q=("q_proj", "query", "wq"),
    k=("k_proj", "key", "wk"),
    v=("v_proj", "value", "wv"),
    o=("o_proj", "out_proj", "dense", "wo"),
    mlp_block=("mlp", "feed_forward", "ffn", ""),
    mlp=(
        "gate_proj", "up_proj", "down_proj",
        "fc1", "fc2",
        "fc_in", "fc_out",
        "c_fc", "c_proj",
        "dense_h_to_4h", "dense_4h_to_h",
        "w1", "w3", "w2",
    ),
)
"""Conventional names; used for every model_type without an entry in :data:`ARCH_SPECS`."""

# Names that signal a fused q/k/v projection; the generic spec refuses to guess their layout.
_FUSED_QKV_NAMES = ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "wqkv", "qkv")
_FUSED_GATE_UP_NAMES = ("gate_up_proj", "w13", "w1w3")

_GPT2 = replace(
    GENERIC_SPEC, name="gpt2", attention=("attn",), q=(), k=(), v=(), o=("c_proj",),
    fused_qkv=(FusedQKV("c_attn", "concat", _all_heads),), mlp_block=("mlp",), mlp=("c_fc", "c_proj"),
)

ARCH_SPECS: dict[str, ArchSpec] = {
    "gpt2": _GPT2,
    # multi-query: c_attn = [q | k | v] with one kv head; multi-head: (n_heads, 3, head_dim) → one formula
    "gpt_bigcode": replace(_GPT2, name="gpt_bigcode", fused_qkv=(FusedQKV("c_attn", "kv_grouped", _bigcode_kv_heads),)),
    # GPTNeoXAttention: qkv.view(..., n_heads, 3 * head_size).chunk(3, dim=-1) → interleaved per head
    "gpt_neox": replace(
        GENERIC_SPEC, name="gpt_neox", attention=("attention",), q=(), k=(), v=(), o=("dense",),
        fused_qkv=(FusedQKV("query_key_value", "kv_grouped", _all_heads),),
        mlp_block=("mlp",), mlp=("dense_h_to_4h", "dense_4h_to_h"),
    ),
    # BloomAttention._reshape: view(..., n_heads, 3, head_dim)
    "bloom": replace(
        GENERIC_SPEC, name="bloom", attention=("self_attention",), q=(), k=(), v=(), o=("dense",),
        fused_qkv=(FusedQKV("query_key_value", "kv_grouped", _all_heads),),
        mlp_block=("mlp",), mlp=("dense_h_to_4h", "dense_4h_to_h"),
    ),
    # FalconAttention._split_heads: all three of its layouts are kv_grouped with the right kv head count
    "falcon": replace(
        GENERIC_SPEC, name="falcon", attention=("self_attention",), q=(), k=(), v=(), o=("dense",),
        fused_qkv=(FusedQKV("query_key_value", "kv_grouped", _falcon_kv_heads),),
        mlp_block=("mlp",), mlp=("dense_h_to_4h", "dense_4h_to_h"),
    ),
    # Phi3Attention: qkv[..., :q_pos], then k and v of n_kv * head_dim each; Phi3MLP: gate, up = chunk(2)
    "phi3": replace(
        GENERIC_SPEC, name="phi3", q=(), k=(), v=(), o=("o_proj",),
        fused_qkv=(FusedQKV("qkv_proj", "concat", _kv_heads_from_config),),
        mlp_block=("mlp",), mlp=("down_proj",), fused_gate_up=("gate_up_proj",),
    ),
}
"""model_type → spec, for architectures the generic names cannot describe."""


def register_architecture(model_type: str, spec: ArchSpec, *, overwrite: bool = False) -> None:
    """Teach :func:`find_targets` a new architecture (keyed by ``config.model_type``)."""
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"spec must be an ArchSpec, got {type(spec).__name__}")
    if model_type in ARCH_SPECS and not overwrite:
        raise ValueError(f"model_type {model_type!r} is already registered; pass overwrite=True to replace it")
    ARCH_SPECS[model_type] = spec


# --------------------------------------------------------------------------------------------------------------
# Model-level lookups
# --------------------------------------------------------------------------------------------------------------


def _text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        return cfg.get_text_config()
    return cfg


def _describe(model: nn.Module) -> str:
    cfg = _text_config(model)
    model_type = getattr(cfg, "model_type", None)
    return f"{type(model).__name__} (model_type={model_type!r})" if model_type else type(model).__name__


def arch_spec(model: nn.Module) -> ArchSpec:
    """The spec used for ``model``: its model_type's entry in :data:`ARCH_SPECS`, else :data:`GENERIC_SPEC`."""
    model_type = getattr(_text_config(model), "model_type", None)
    return ARCH_SPECS.get(model_type, GENERIC_SPEC)


def _get(root: nn.Module, path: str) -> nn.Module | None:
    if path == "":
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _layers_with_path(model: nn.Module) -> tuple[str, nn.ModuleList]:
    spec = arch_spec(model)
    # A peft PeftModel: look inside its base model; names stay qualified from the PeftModel itself.
    root, prefix = (model.get_base_model(), "base_model.model.") if _is_peft_model(model) else (model, "")
    for path in spec.layers:
        found = _get(root, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return prefix + path, found
    raise UnsupportedModelError(
        f"{_describe(model)}: no decoder layer list found (looked for a non-empty nn.ModuleList at "
        f"{', '.join(spec.layers)})"
    )


def _is_peft_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("peft.") and callable(getattr(model, "get_base_model", None))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (e.g. ``model.model.layers``, ``model.transformer.h``)."""
    return _layers_with_path(model)[1]


def layer_of(model: nn.Module, module_name: str) -> int | None:
    """Index of the decoder layer holding ``module_name`` (qualified from ``model``); None for a module outside them."""
    path, layers = _layers_with_path(model)
    head = module_name[len(path) + 1:].split(".", 1)[0] if module_name.startswith(path + ".") else ""
    return int(head) if head.isdigit() and int(head) < len(layers) else None


def num_layers(model: nn.Module) -> int:
    """Number of decoder layers."""
    return len(decoder_layers(model))


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream inside the decoder layers (``config.hidden_size`` of the text model).

    Falls back to the input embedding width for a model without a config. (OPT variants with
    ``word_embed_proj_dim != hidden_size`` project embeddings in; this returns the layer width.)
    """
    cfg = _text_config(model)
    size = getattr(cfg, "hidden_size", None)
    if isinstance(size, int) and size > 0:
        return size
    return input_embeddings(model).embedding_dim


def input_embeddings(model: nn.Module) -> nn.Embedding:
    """The token embedding table (``model.get_input_embeddings()``)."""
    getter = getattr(model, "get_input_embeddings", None)
    emb = getter() if callable(getter) else None
    if not isinstance(emb, nn.Embedding):
        found = "no get_input_embeddings()" if not callable(getter) else f"it returned {type(emb).__name__}"
        raise UnsupportedModelError(f"{_describe(model)}: no input token embedding nn.Embedding ({found})")
    return emb


# --------------------------------------------------------------------------------------------------------------
# Sites
# --------------------------------------------------------------------------------------------------------------


def _check_roles(roles: str | Iterable[str]) -> list[str]:
    requested = [roles] if isinstance(roles, str) else list(roles)
    if not requested:
        raise ValueError(f"no roles given; choose from {ROLES}")
    for role in requested:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; valid roles are {ROLES}")
    return [r for r in ROLES if r in requested]  # canonical order, duplicates dropped


def _check_layer_indices(indices: Iterable[int], n_layers: int) -> list[int]:
    if isinstance(indices, (int, str, bytes)) or not isinstance(indices, Iterable):
        raise ValueError(f"layer indices must be an iterable of ints, got {indices!r}")
    chosen = []
    for i in indices:
        if isinstance(i, bool):
            raise ValueError(f"layer index {i!r} is not an int")
        try:
            chosen.append(operator.index(i))  # accepts numpy / 0-d torch integers, rejects 1.0
        except TypeError:
            raise ValueError(f"layer index {i!r} is not an int") from None
    if not chosen:
        raise ValueError("no layers selected")
    seen: set[int] = set()
    for i in chosen:
        if not 0 <= i < n_layers:
            raise ValueError(
                f"layer index {i} out of range for a model with {n_layers} layers (valid: 0..{n_layers - 1})"
            )
        if i in seen:
            raise ValueError(f"layer index {i} given twice")
        seen.add(i)
    return sorted(chosen)


def _base_layer(module: nn.Module | None) -> nn.Module | None:
    """The layer a PEFT tuner layer wraps (a LoRA ``lora.Linear`` → its ``base_layer``); any other module itself."""
    get_base_layer = getattr(module, "get_base_layer", None)
    return get_base_layer() if callable(get_base_layer) else module


def _is_linear(module: nn.Module | None) -> bool:
    # A LoRA layer at a role's place is a site too: the video delta then adds to base + LoRA output.
    return isinstance(_base_layer(module), (nn.Linear, Conv1D))


def _dims(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, transposed) of a Linear or Conv1D (or of the layer a PEFT layer wraps).

    Read from the module's attributes, not its weight shape, which quantized Linear subclasses pack.
    """
    module = _base_layer(module)
    if isinstance(module, Conv1D):
        return module.nx, module.nf, True
    return module.in_features, module.out_features, False


class _LayerResolver:
    """Finds the role sites of one decoder layer according to a spec; errors name what was looked for."""

    def __init__(self, model: nn.Module, spec: ArchSpec, prefix: str, index: int, layer: nn.Module):
        self.model, self.spec, self.index, self.layer = model, spec, index, layer
        self.prefix = prefix  # qualified name of the layer

    def _fail(self, what: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{_describe(self.model)}: layer {self.index} {what}")

    def _site(self, role: str, path: str, module: nn.Module, part: str,
              out_slice: slice | None = None, groups: int = 1) -> TargetSite:
        if not _is_linear(module):
            raise self._fail(f"module {path!r} for role {role!r} is a {type(module).__name__}, "
                             "not an nn.Linear or Conv1D")
        n_in, n_out, transposed = _dims(module)
        if out_slice is None:
            out_slice = slice(0, n_out)
        width = (out_slice.stop - out_slice.start) * groups
        return TargetSite(layer=self.index, role=role, name=f"{self.prefix}.{path}", module=module,
                          out_slice=out_slice, in_features=n_in, out_features=width, transposed=transposed,
                          out_groups=groups, part=part)

    def attention(self) -> tuple[str, nn.Module]:
        for path in self.spec.attention:
            found = _get(self.layer, path)
            if found is not None:
                return path, found
        raise self._fail(f"has no attention module (looked for {', '.join(self.spec.attention)})")

    def attention_role(self, role: str) -> TargetSite:
        attn_path, attn = self.attention()
        candidates: tuple[str, ...] = getattr(self.spec, role)
        for name in candidates:
            found = _get(attn, name)
            if found is not None:
                return self._site(role, f"{attn_path}.{name}", found, part=name)
        if role != "o":
            for fused in self.spec.fused_qkv:
                found = _get(attn, fused.attr)
                if found is not None:
                    return self._fused_qkv_site(role, f"{attn_path}.{fused.attr}", found, fused)
            unknown = [n for n in _FUSED_QKV_NAMES if _get(attn, n) is not None]
            if unknown:
                raise self._fail(
                    f"has a fused q/k/v projection '{attn_path}.{unknown[0]}' whose output layout is unknown for "
                    f"this architecture (spec {self.spec.name!r}); add an ArchSpec with register_architecture()"
                )
        looked = [f"{attn_path}.{n}" for n in candidates]
        looked += [f"{attn_path}.{f.attr} (fused)" for f in self.spec.fused_qkv if role != "o"]
        raise self._fail(f"has no module for role {role!r} (looked for {', '.join(looked) or 'nothing'})")

    def _fused_qkv_site(self, role: str, path: str, module: nn.Module, fused: FusedQKV) -> TargetSite:
        cfg = _text_config(self.model)
        n_heads = cfg.num_attention_heads
        n_kv = fused.kv_heads(cfg)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        if n_kv < 1 or n_heads % n_kv:
            raise self._fail(f"{path}: {n_heads} attention heads are not divisible into {n_kv} kv heads")
        groups = n_kv if fused.layout == "kv_grouped" else 1
        q_w, kv_w = n_heads // groups * head_dim, n_kv // groups * head_dim
        _, n_out, _ = _dims(module)
        if groups * (q_w + 2 * kv_w) != n_out:
            raise self._fail(
                f"{path}: output width {n_out} does not match the {fused.layout} q/k/v layout of {n_heads} heads, "
                f"{n_kv} kv heads, head_dim {head_dim}"
            )
        start = {"q": 0, "k": q_w, "v": q_w + kv_w}[role]
        width = q_w if role == "q" else kv_w
        return self._site(role, path, module, part=role, out_slice=slice(start, start + width), groups=groups)

    def mlp_sites(self) -> list[TargetSite]:
        for block_path in self.spec.mlp_block:
            block = _get(self.layer, block_path)
            if block is None:
                continue
            sites: list[TargetSite] = []
            for name in self.spec.fused_gate_up:
                found = _get(block, name)
                if found is None:
                    continue
                path = f"{block_path}.{name}" if block_path else name
                if not _is_linear(found):
                    raise self._fail(f"module {path!r} for role 'mlp' is a {type(found).__name__}, "
                                     "not an nn.Linear or Conv1D")
                n_out = _dims(found)[1]
                if n_out % 2:
                    raise self._fail(f"fused gate/up projection {path!r} has odd output width {n_out}")
                half = n_out // 2
                sites.append(self._site("mlp", path, found, "gate", slice(0, half)))
                sites.append(self._site("mlp", path, found, "up", slice(half, n_out)))
            for name in self.spec.mlp:
                found = _get(block, name)
                if found is not None:
                    sites.append(self._site("mlp", f"{block_path}.{name}" if block_path else name, found, name))
            if block_path:
                # checked even when some linears were found: returning only down_proj would be a silent half-MLP
                if _get(block, "experts") is not None:
                    raise self._fail(
                        f"has a mixture-of-experts MLP ('{block_path}.experts'), which role 'mlp' does not support; "
                        "choose roles without 'mlp'"
                    )
                unknown = [n for n in _FUSED_GATE_UP_NAMES
                           if n not in self.spec.fused_gate_up and _get(block, n) is not None]
                if unknown:
                    raise self._fail(
                        f"has a fused MLP projection '{block_path}.{unknown[0]}' whose layout is unknown for this "
                        f"architecture (spec {self.spec.name!r}); add an ArchSpec with register_architecture()"
                    )
            if sites:
                return sites
        names = ", ".join(self.spec.fused_gate_up + self.spec.mlp)
        blocks = ", ".join(b or "<layer>" for b in self.spec.mlp_block)
        raise self._fail(f"has no module for role 'mlp' (looked for {names} in {blocks})")


def find_targets(
    model: nn.Module, roles: str | Iterable[str] = ROLES, layers: Iterable[int] | None = None
) -> list[TargetSite]:
    """All sites of the requested roles on the requested decoder layers.

    Args:
        model: a HF causal LM (or its base model / a multimodal wrapper with a language model inside).
        roles: role names from :data:`ROLES` (a single string is one role).
        layers: decoder layer indices; None selects all layers.

    Returns:
        Sites sorted by layer, then role in :data:`ROLES` order, then in the order the MLP applies its linears.

    Raises:
        ValueError: unknown role, empty selection, or a bad layer index.
        UnsupportedModelError: the model lacks a layer list or a module for a requested role.
    """
    wanted = _check_roles(roles)
    spec = arch_spec(model)
    path, layer_list = _layers_with_path(model)
    indices = range(len(layer_list)) if layers is None else _check_layer_indices(layers, len(layer_list))
    sites: list[TargetSite] = []
    for i in indices:
        resolver = _LayerResolver(model, spec, f"{path}.{i}", i, layer_list[i])
        for role in wanted:
            if role == "mlp":
                sites.extend(resolver.mlp_sites())
            else:
                sites.append(resolver.attention_role(role))
    return sites


# --------------------------------------------------------------------------------------------------------------
# Layer selection
# --------------------------------------------------------------------------------------------------------------


def injection_layers(n_layers: int, every: int | None = None, explicit: Sequence[int] | None = None) -> list[int]:
    """Decoder layers that receive video deltas: every ``every``-th layer, or an ``explicit`` list (exactly one).

    Rule for ``every=k``: layers ``0, k, 2k, ...`` below ``n_layers`` (``ceil(n_layers / k)`` layers; 8 of 32 for
    ViPE's k=4). Starting at layer 0 lets the video shape every later layer's computation, while a delta on the
    last layer can only act through the final norm and head; with ``k >= n_layers`` only layer 0 is injected.

    ``explicit`` indices must be ints in ``[0, n_layers)`` without repeats; the result is sorted.
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    if (every is None) == (explicit is None):
        raise ValueError("give exactly one of `every` and `explicit`")
    if every is not None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        return list(range(0, n_layers, every))
    return _check_layer_indices(explicit, n_layers)
