"""Tiny random causal LMs for tests, built from transformers' own config classes (no downloads).

Every entry of :data:`ARCHITECTURES` is a zero-argument factory returning a fresh config with 4 decoder layers
(so that "inject every 2 layers" selects a strict subset), hidden size 32–64, a vocabulary of 256 and at least
256 positions. :func:`make_tiny_lm` turns one into an fp32 model in eval mode with a deterministic initialisation.

The matrix deliberately covers the structural variants ``video2param.targets`` must handle: separate q/k/v/o
projections with grouped-query attention (Llama family), per-layer q/k norms (Qwen3, Gemma3), MLP linears that sit
directly on the decoder layer (OPT), fused concatenated projections (Phi-3 ``qkv_proj`` and ``gate_up_proj``,
GPT-2 ``c_attn`` stored as a transposed ``Conv1D``, GPT-BigCode multi-query ``c_attn``) and fused projections
interleaved per head or per key/value group (GPT-NeoX, Bloom, Falcon ``query_key_value``).

Usage from another test module (``tests/`` is on ``sys.path`` under pytest)::

    from tiny_models import ARCHITECTURES, make_tiny_lm
    model = make_tiny_lm("llama", seed=0)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    FalconConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTBigCodeConfig,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OlmoConfig,
    OPTConfig,
    Phi3Config,
    PhiConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
    StableLmConfig,
    Starcoder2Config,
)

VOCAB_SIZE = 256
NUM_LAYERS = 4
MAX_POSITIONS = 512

# Eager attention: every architecture in the matrix implements it, it applies a padding mask without the
# fully-masked-row special cases of SDPA, and it is deterministic on CPU.
ATTN_IMPLEMENTATION = "eager"

# Token ids reserved in every tiny vocabulary; tests for the token path may rely on them.
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2

_SPECIAL = {"pad_token_id": PAD_TOKEN_ID, "bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID}

# Fields shared by configs that use the modern (Llama-style) names.
_LLAMA_STYLE = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention: k/v projections are narrower than q
    max_position_embeddings=MAX_POSITIONS,
    tie_word_embeddings=False,
    **_SPECIAL,
)


def _llama() -> PretrainedConfig:
    return LlamaConfig(**_LLAMA_STYLE)


def _qwen2() -> PretrainedConfig:
    return Qwen2Config(**_LLAMA_STYLE)


def _qwen3() -> PretrainedConfig:
    # head_dim set explicitly: Qwen3 decouples it from hidden_size / num_heads (q_proj is 4*16 = 64 wide here).
    return Qwen3Config(**_LLAMA_STYLE, head_dim=16)


def _mistral() -> PretrainedConfig:
    return MistralConfig(**_LLAMA_STYLE, sliding_window=None)


def _gemma() -> PretrainedConfig:
    return GemmaConfig(**_LLAMA_STYLE, head_dim=8)


def _gemma2() -> PretrainedConfig:
    return Gemma2Config(**_LLAMA_STYLE, head_dim=8, query_pre_attn_scalar=8, sliding_window=64)


def _gemma3_text() -> PretrainedConfig:
    return Gemma3TextConfig(**_LLAMA_STYLE, head_dim=8, query_pre_attn_scalar=8, sliding_window=64)


def _phi() -> PretrainedConfig:
    cfg = {**_LLAMA_STYLE, "num_key_value_heads": 4}
    return PhiConfig(**cfg)


def _phi3() -> PretrainedConfig:
    # GQA makes the q/k/v slices of the fused qkv_proj unequal (32, 16, 16), which is what the tests must catch.
    return Phi3Config(**_LLAMA_STYLE, original_max_position_embeddings=MAX_POSITIONS, sliding_window=None)


def _olmo() -> PretrainedConfig:
    return OlmoConfig(**_LLAMA_STYLE)


def _stablelm() -> PretrainedConfig:
    return StableLmConfig(**_LLAMA_STYLE)


def _starcoder2() -> PretrainedConfig:
    return Starcoder2Config(**_LLAMA_STYLE, sliding_window=None)


def _gpt2() -> PretrainedConfig:
    return GPT2Config(
        vocab_size=VOCAB_SIZE, n_embd=32, n_layer=NUM_LAYERS, n_head=4, n_inner=64, n_positions=MAX_POSITIONS,
        tie_word_embeddings=False, **_SPECIAL,
    )


def _gpt_bigcode() -> PretrainedConfig:
    return GPTBigCodeConfig(
        vocab_size=VOCAB_SIZE, n_embd=32, n_layer=NUM_LAYERS, n_head=4, n_inner=64, n_positions=MAX_POSITIONS,
        multi_query=True, tie_word_embeddings=False, **_SPECIAL,
    )


def _gptj() -> PretrainedConfig:
    return GPTJConfig(
        vocab_size=VOCAB_SIZE, n_embd=32, n_layer=NUM_LAYERS, n_head=4, n_inner=64, rotary_dim=4,
        n_positions=MAX_POSITIONS, tie_word_embeddings=False, **_SPECIAL,
    )


def _gpt_neox() -> PretrainedConfig:
    return GPTNeoXConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False, **_SPECIAL,
    )


def _bloom() -> PretrainedConfig:
    return BloomConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, n_layer=NUM_LAYERS, n_head=4, tie_word_embeddings=False, **_SPECIAL,
    )


def _falcon() -> PretrainedConfig:
    # new_decoder_architecture with 2 kv heads: query_key_value is laid out per kv group as [q q k v] — the
    # general interleaved case (NeoX/Bloom are the special case of one query head per group).
    return FalconConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True, ffn_hidden_size=64, max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False, **_SPECIAL,
    )


def _opt() -> PretrainedConfig:
    return OPTConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, ffn_dim=64, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False, **_SPECIAL,
    )


ARCHITECTURES: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "mistral": _mistral,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3_text": _gemma3_text,
    "phi": _phi,
    "phi3": _phi3,
    "olmo": _olmo,
    "stablelm": _stablelm,
    "starcoder2": _starcoder2,
    "gpt2": _gpt2,
    "gpt_bigcode": _gpt_bigcode,
    "gptj": _gptj,
    "gpt_neox": _gpt_neox,
    "bloom": _bloom,
    "falcon": _falcon,
    "opt": _opt,
}
"""Architecture name → factory of a tiny config. Names are the configs' ``model_type``."""

REPRESENTATIVE_ARCHITECTURES: tuple[str, ...] = (
    "llama",  # separate q/k/v/o with grouped-query attention, gate/up/down MLP
    "qwen3",  # q/k RMSNorm after the projections, head_dim decoupled from hidden_size
    "phi",  # o is `dense`, MLP fc1/fc2
    "opt",  # fc1/fc2 directly on the decoder layer, q scaled after projection
    "phi3",  # fused concatenated qkv_proj (GQA widths) and gate_up_proj
    "gpt2",  # transposed Conv1D, fused c_attn
    "gpt_neox",  # query_key_value interleaved per head
    "falcon",  # query_key_value interleaved per kv group
)
"""One architecture per structural variant, for tests too slow to run over the whole matrix."""


def tiny_config(arch: str, vocab_size: int | None = None) -> PretrainedConfig:
    """A fresh tiny config for ``arch`` (a key of :data:`ARCHITECTURES`), optionally with another vocabulary size."""
    try:
        factory = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {sorted(ARCHITECTURES)}") from None
    cfg = factory()
    if vocab_size is not None:
        if vocab_size <= EOS_TOKEN_ID:
            raise ValueError(f"vocab_size must be > {EOS_TOKEN_ID} to hold the special tokens, got {vocab_size}")
        cfg.vocab_size = vocab_size
    return cfg


def make_tiny_lm(arch: str, seed: int = 0, vocab_size: int | None = None) -> PreTrainedModel:
    """Build a tiny random causal LM of architecture ``arch``: fp32, eval mode, eager attention.

    The same ``(arch, seed, vocab_size)`` always gives bit-identical weights; the global RNG state is saved
    and restored, so calling this does not perturb the caller's random stream.
    """
    cfg = tiny_config(arch, vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.float32)
    return model.eval()


def left_padded_batch(
    lengths: list[int], vocab_size: int = VOCAB_SIZE, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(input_ids, attention_mask)`` with left padding: row ``i`` has ``lengths[i]`` real tokens.

    Real tokens are drawn from ``[EOS_TOKEN_ID + 1, vocab_size)``; padding uses ``PAD_TOKEN_ID`` with mask 0.
    """
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths must be a non-empty list of positive ints, got {lengths}")
    width = max(lengths)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), width), PAD_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(EOS_TOKEN_ID + 1, vocab_size, (n,), generator=gen)
        mask[row, width - n:] = 1
    return ids, mask


def make_tiny_dual_encoder(family: str = "clip", *, words=None, vision_width: int = 16, grid: int = 2,
                           text_positions: int = 16, seed: int = 0, **vision_kwargs):
    """A tiny CLIP or SigLIP dual encoder (both towers) built from configs, as a ``DualEncoder``.

    Its text tower reads with a word tokenizer over ``words`` (default: the tests' ``WORDS``); its vision tower turns
    an 8·grid-pixel square frame into grid × grid patches (8-pixel patches) of width ``vision_width``; text contexts have
    ``text_positions`` positions. Same arguments, same weights.
    """
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    from conftest import WORDS
    from video2param.data.tokenizer import build_word_tokenizer
    from video2param.video.dual_encoder import DualEncoder

    tok = build_word_tokenizer(WORDS if words is None else words)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=text_positions, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(image_size=8 * grid, patch_size=8, hidden_size=vision_width, intermediate_size=2 * vision_width,
                  num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(seed)
    if family == "clip":
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    elif family == "siglip":
        # SigLIP compares the text head's output with the vision head's: both vision_width wide.
        model = SiglipModel(SiglipConfig(text_config={**text, "projection_size": vision_width}, vision_config=vision))
        with torch.no_grad():
            model.logit_scale.fill_(2.0)  # a random SigLIP starts at exp(0) = 1; make the relevance map peaked
    else:
        raise ValueError(f"family: expected 'clip' or 'siglip', got {family!r}")
    return DualEncoder(model.eval(), text_tokenizer=tok, **vision_kwargs)
