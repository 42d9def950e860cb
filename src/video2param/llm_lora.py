"""A PEFT LoRA on the LLM beside the video adapter (the papers' stage 2): attach, find, save and restore it.

The LoRA is peft's own (``peft.LoraConfig``, ``lora.Linear`` layers injected into the HF model in place); the video
adapter's ``LowRankWrapper`` wraps the LoRA layer, so one projection computes ``base(x) + LoRA(x) + video delta``.
Both orders of attaching end in that same nesting:

* LoRA first: ``wrap_model(peft_model, ...)`` (a ``PeftModel``: its base model is wrapped, LoRA layers and all) or
  ``wrap_model(llm, ..., llm_lora=LoraConfig(...))``;
* video first: ``attach_llm_lora(vm, LoraConfig(...))`` on an existing ``VideoModel``: the video wrappers step aside
  while peft injects its layers (so peft's own target matching sees the model's plain module names), then wrap the
  new LoRA layers.

Module names never change: a video site is ``model.layers.0.self_attn.q_proj`` with or without the LoRA (so a stage-1
adapter loads into a stage-2 model), and the LoRA's tensors are saved under the names peft would give them on the
plain model: ``VideoModel.save_pretrained`` writes them as a standard PEFT adapter (``adapter_config.json`` +
``adapter_model.safetensors``, keys ``base_model.model.<module>.lora_A.weight``) in the subfolder
:data:`LORA_SUBDIR`, which ``PeftModel.from_pretrained(llm, "<adapter>/llm_lora")`` also loads.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "LORA_SUBDIR",
    "attach_llm_lora",
    "detach_llm_lora",
    "llm_lora_config",
    "llm_lora_factors",
    "llm_lora_parameters",
    "llm_lora_state_dict",
    "load_llm_lora_state",
    "read_llm_lora",
    "resolve_llm",
    "save_llm_lora",
]

#: Subfolder of a video adapter directory holding the LLM's LoRA as a standard PEFT adapter.
LORA_SUBDIR = "llm_lora"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def _peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - peft is a dependency
        raise ImportError("a LoRA on the LLM needs peft: pip install peft") from err
    return peft


def _is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def _check_lora_config(config: Any, what: str = "llm_lora") -> Any:
    peft = _peft()
    if not isinstance(config, peft.LoraConfig):
        raise ValueError(f"{what}: expected a peft.LoraConfig, got {type(config).__name__}")
    return config


def resolve_llm(llm: nn.Module, llm_lora: Any = None) -> nn.Module:
    """The HF model a ``VideoModel`` wraps: a ``PeftModel`` gives its base model (its LoRA layers stay in place).

    Raises ValueError for a PEFT model that is not a single LoRA, or for ``llm_lora=`` given with an LLM that has
    a LoRA already.
    """
    if _is_peft_model(llm):
        configs = dict(llm.peft_config)
        if len(configs) != 1:
            raise ValueError(
                f"llm: the PeftModel holds {len(configs)} adapters ({', '.join(configs)}); a video model supports "
                "one LoRA on the LLM (delete the others first)"
            )
        (name, config), = configs.items()
        if type(config).__name__ != "LoraConfig":
            raise ValueError(f"llm: the PeftModel's adapter {name!r} is a {type(config).__name__}; only LoRA is "
                             "supported")
        llm = llm.get_base_model()
    if llm_lora is not None:
        _check_lora_config(llm_lora)
        if llm_lora_config(llm) is not None:
            raise ValueError("llm_lora: the LLM already carries a LoRA (a PeftModel?); pass one or the other")
    return llm


def llm_lora_config(llm: nn.Module) -> Any | None:
    """The ``LoraConfig`` of the LoRA attached to ``llm`` (None without one)."""
    configs = getattr(llm, "peft_config", None)
    if not configs or not _lora_layers(llm):
        return None
    return next(iter(configs.values()))


def _adapter_name(llm: nn.Module) -> str:
    return next(iter(llm.peft_config))


def _lora_layers(llm: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        return []
    return [(name, module) for name, module in llm.named_modules() if isinstance(module, LoraLayer)]


def llm_lora_factors(llm: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
    """The LLM's LoRA as plain factors: {module name without the video wrappers: (A (r, d_in), B (d_out, r) with the
    LoRA's scaling folded in, transposed (a GPT-2 Conv1D))}, float32 on the CPU; empty without a LoRA.

    Raises ValueError for what a plain LoRA of those factors cannot carry (DoRA, modules_to_save, trained biases,
    lora_bias, trainable token indices, embedding or convolution LoRA layers) and for NaN/inf.
    """
    from transformers.pytorch_utils import Conv1D

    config = llm_lora_config(llm)
    if config is None:
        return {}
    blockers = [what for what, present in (
        ("use_dora", getattr(config, "use_dora", False)),
        ("modules_to_save", bool(getattr(config, "modules_to_save", None))),
        (f"bias={config.bias!r}", getattr(config, "bias", "none") != "none"),
        ("lora_bias", getattr(config, "lora_bias", False)),
        ("trainable_token_indices", bool(getattr(config, "trainable_token_indices", None))),
    ) if present]
    if blockers:
        raise ValueError(f"export: the LLM's LoRA uses {', '.join(blockers)}, which one plain LoRA cannot carry; "
                         "merge it into the base model first (merge_and_unload) and export against that model")
    name, wrappers = _adapter_name(llm), _wrapper_names(llm)
    factors = {}
    for module_name, layer in _lora_layers(llm):
        if name not in getattr(layer, "lora_A", {}):
            raise ValueError(f"export: {module_name}: the LLM's LoRA layer is not a Linear LoRA (an embedding or "
                             "convolution LoRA cannot be exported with the video's)")
        A = layer.lora_A[name].weight.detach().to("cpu", torch.float32)
        B = layer.lora_B[name].weight.detach().to("cpu", torch.float32) * float(layer.scaling[name])
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"export: the LLM's LoRA on {module_name} contains NaN or inf")
        factors[_plain_name(module_name, wrappers)] = (A, B, isinstance(layer.get_base_layer(), Conv1D))
    return factors


def llm_lora_parameters(llm: nn.Module) -> list[nn.Parameter]:
    """The parameters the LLM's LoRA trains (what peft marks trainable: the A/B factors, ``modules_to_save`` copies,
    biases when ``bias`` is ``"all"`` / ``"lora_only"``); empty without a LoRA."""
    config = llm_lora_config(llm)
    if config is None:
        return []
    lora_only_bias = {f"{name}.base_layer.bias" for name, _ in _lora_layers(llm)}
    params = []
    for name, param in llm.named_parameters():
        if ("lora_" in name or ".modules_to_save." in name
                or (config.bias == "all" and name.endswith(".bias"))
                or (config.bias == "lora_only" and name in lora_only_bias)):
            params.append(param)
    return params


# ---- the video wrappers around LoRA layers ---------------------------------------------------------------------
def _wrapper_names(llm: nn.Module) -> list[str]:
    from .inject.lowrank import LowRankWrapper

    # Longest first, so a nested name is rewritten before its parent's prefix.
    return sorted((n for n, m in llm.named_modules() if isinstance(m, LowRankWrapper)), key=len, reverse=True)


def _plain_name(name: str, wrappers: list[str]) -> str:
    """``name`` as it would be without the video wrappers (``...q_proj.base.lora_A`` → ``...q_proj.lora_A``)."""
    for wrapper in wrappers:
        inner = f"{wrapper}.base"
        if name == inner or name.startswith(inner + "."):
            return wrapper + name[len(inner):]
    return name


@contextlib.contextmanager
def _plain_module_tree(llm: nn.Module) -> Iterator[None]:
    """Take the video wrappers out of ``llm`` inside the block and put them back around what is there afterwards.

    peft then sees the model's plain module names (its target matching, its state dict keys). Refused while a video
    is merged into the weights. Not for use while other threads call the model.
    """
    from .inject.lowrank import LowRankWrapper

    wrappers = [(n, m) for n, m in llm.named_modules() if isinstance(m, LowRankWrapper)]
    for name, wrapper in wrappers:
        if wrapper.merged_context is not None:
            raise RuntimeError(f"{name}: a video is merged into the weights; leave the merged() block first")
    for name, wrapper in wrappers:
        _set_module(llm, name, wrapper.base)
    try:
        yield
    finally:
        for name, wrapper in wrappers:
            wrapper.base = llm.get_submodule(name)  # peft may have replaced the module: the wrapper takes the new one
            _set_module(llm, name, wrapper)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


# ---- attach / detach -----------------------------------------------------------------------------------------
def attach_llm_lora(model: nn.Module, config: Any, adapter_name: str = "default") -> nn.Module:
    """Inject a peft LoRA (``config``, a ``peft.LoraConfig``) into an LLM, or into a ``VideoModel``'s LLM.

    With a ``VideoModel``, its video wrappers end up around the new LoRA layers and its stage is applied again (in
    stage ``sft`` the LoRA then trains and the rest of the LLM is frozen). Returns ``model``.
    Raises ValueError when the LLM already has a LoRA or ``config`` is not a ``LoraConfig``.
    """
    from .model import VideoModel

    peft = _peft()
    config = copy.deepcopy(_check_lora_config(config, "config"))
    llm = model.llm if isinstance(model, VideoModel) else model
    if llm_lora_config(llm) is not None or _is_peft_model(llm):
        raise ValueError("config: the LLM already carries a LoRA; a video model supports one")
    with _plain_module_tree(llm):
        peft.inject_adapter_in_model(config, llm, adapter_name=adapter_name)
    if isinstance(model, VideoModel):
        model.set_stage(model.stage)
    return model


def detach_llm_lora(llm: nn.Module) -> nn.Module:
    """Remove the LoRA layers from ``llm`` (each goes back to the module it wrapped); returns ``llm``."""
    with _plain_module_tree(llm):
        for name, layer in _lora_layers(llm):
            _set_module(llm, name, layer.get_base_layer())
        if hasattr(llm, "peft_config"):
            del llm.peft_config
    return llm


# ---- state dict, save, load ----------------------------------------------------------------------------------
def _peft_view(llm: nn.Module) -> nn.Module:
    """A module tree holding the LLM's peft modules under their plain names (the video wrappers looked through).

    peft's state-dict helpers find the LoRA's tensors by walking the model; handed this view, they see the names
    the LoRA has on the plain model, without the LLM being changed (so saving is safe while other threads call it).
    The view shares the modules: loading into it loads into the LLM.
    """
    wrappers = _wrapper_names(llm)
    view = nn.Module()
    view.peft_config = llm.peft_config
    placed: list[str] = []
    for name, module in llm.named_modules():
        if not type(module).__module__.startswith("peft.") or any(name.startswith(p + ".") for p in placed):
            continue
        placed.append(name)
        parent = view
        *path, leaf = _plain_name(name, wrappers).split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, module)
    return view


def llm_lora_state_dict(llm: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The LoRA's tensors with the keys of a standard PEFT adapter file (``base_model.model.<module>.lora_A.weight``).

    Read without changing the model (safe while other threads call it). ``state``: the LLM's full state dict as
    gathered by a sharding engine (keys as in ``llm.state_dict()``), read instead of the live (sharded) tensors.
    """
    from peft import get_peft_model_state_dict

    if llm_lora_config(llm) is None:
        return {}
    view = _peft_view(llm)
    if state is not None:
        wrappers = _wrapper_names(llm)
        state = {_plain_name(k, wrappers): v for k, v in state.items()}
    # save_embedding_layers=False: 'auto' may look the base model up on the Hub; the video token needs no row.
    out = get_peft_model_state_dict(view, state_dict=state, adapter_name=_adapter_name(llm),
                                    save_embedding_layers=False)
    return {_PEFT_PREFIX + k: v for k, v in out.items()}


def llm_lora_live_names(llm: nn.Module) -> dict[str, str]:
    """{PEFT file key: name of that tensor in ``llm.state_dict()``} for the LoRA attached to ``llm`` (the video
    wrappers' ``.base`` included), matched by tensor identity."""
    from peft import get_peft_model_state_dict

    if llm_lora_config(llm) is None:
        return {}
    live = {id(t): n for n, t in llm.state_dict(keep_vars=True).items()}
    view = _peft_view(llm)
    tensors = get_peft_model_state_dict(view, state_dict=view.state_dict(keep_vars=True),
                                        adapter_name=_adapter_name(llm), save_embedding_layers=False)
    return {_PEFT_PREFIX + key: live[id(t)] for key, t in tensors.items()}


def _config_json(config: Any, base_name: str | None) -> bytes:
    config = copy.deepcopy(config)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = base_name
    config.inference_mode = True  # as PeftModel.save_pretrained writes it
    data = config.to_dict()
    for key, value in data.items():
        if isinstance(value, set):
            data[key] = sorted(value)
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def save_llm_lora(llm: nn.Module, directory: str | os.PathLike, state: dict[str, torch.Tensor] | None = None) -> str:
    """Write the LLM's LoRA into ``directory`` as a standard PEFT adapter, each file atomically (the video adapter's
    machinery); returns the SHA-256 of the weights file. ``state``: see :func:`llm_lora_state_dict`."""
    from safetensors.torch import save_file

    from .serialization import save_file_pair

    config = llm_lora_config(llm)
    if config is None:
        raise ValueError("save_llm_lora: the LLM has no LoRA")
    tensors = {k: v.detach().contiguous().cpu() for k, v in llm_lora_state_dict(llm, state).items()}
    digest: dict[str, str] = {}

    def write_weights(path: Path) -> None:
        save_file(tensors, os.fspath(path), metadata={"format": "pt"})

    def make_config(weights_sha256: str) -> bytes:
        digest["sha256"] = weights_sha256
        return _config_json(config, getattr(llm.config, "_name_or_path", None) or None)

    save_file_pair(directory, weights_name=PEFT_WEIGHTS_NAME, write_weights=write_weights,
                   config_name=PEFT_CONFIG_NAME, make_config=make_config, card=None)
    return digest["sha256"]


def read_llm_lora(directory: str | os.PathLike,
                  expected_sha256: str | None = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """Read a PEFT LoRA adapter folder (JSON + safetensors only): its ``LoraConfig`` and its tensors.

    ``expected_sha256`` (what the video adapter recorded) must match the weights file. Raises FileNotFoundError for
    missing files, ValueError for another PEFT type, a weights file from another save, or NaN/inf.
    """
    import hashlib

    from safetensors.torch import load as load_bytes

    from .serialization import check_finite

    peft = _peft()
    directory = Path(directory)
    config_path, weights_path = directory / PEFT_CONFIG_NAME, directory / PEFT_WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"LLM LoRA {directory}: missing {path.name}")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"LLM LoRA {directory}: {PEFT_CONFIG_NAME} is not valid JSON ({err})") from err
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        found = data.get("peft_type") if isinstance(data, dict) else None
        raise ValueError(f"LLM LoRA {directory}: peft_type is {found!r}, expected 'LORA'")
    blob = weights_path.read_bytes()
    if expected_sha256 is not None and hashlib.sha256(blob).hexdigest() != expected_sha256:
        raise ValueError(
            f"LLM LoRA {directory}: {PEFT_WEIGHTS_NAME} is not the file the video adapter was saved with (a save "
            "was interrupted between the two, or the folder was replaced); save the adapter again"
        )
    config = peft.LoraConfig.from_pretrained(os.fspath(directory))
    state = load_bytes(blob)
    check_finite(state, f"LLM LoRA {directory}")
    return config, state


def load_llm_lora_state(llm: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy PEFT-file tensors (``base_model.model.<module>.lora_A.weight``) into the LoRA attached to ``llm``.

    Every LoRA tensor of the model must be given and every given tensor must be used; ValueError naming them
    otherwise (peft itself would skip them silently).
    """
    if llm_lora_config(llm) is None:
        raise ValueError("the LLM has no LoRA to load tensors into")
    names = llm_lora_live_names(llm)
    targets = llm.state_dict(keep_vars=True)
    unknown = sorted(set(state) - set(names))
    missing = sorted(set(names) - set(state))
    wrong = sorted(k for k in set(state) & set(names) if state[k].shape != targets[names[k]].shape)
    if unknown or missing or wrong:
        parts = [f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                 for label, keys in (("unexpected", unknown), ("missing", missing), ("wrong shape", wrong)) if keys]
        raise ValueError("LLM LoRA does not fit this model: " + "; ".join(parts))
    with torch.no_grad():
        for key, name in names.items():
            targets[name].copy_(state[key])
