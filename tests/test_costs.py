"""Cost figures: the FLOP count includes attention (on the CPU too), so it grows quadratically with the tokens."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from video2param import wrap_model
from video2param.bench import llm_flops

HIDDEN, LAYERS, PROMPT = 32, 2, 6


def _llava(attn_implementation: str):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    llm = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()
    return wrap_model(llm, method="llava", vision_hidden_size=8, num_frames=8)


def _flops(vm, frames: int) -> float:
    ids = torch.randint(4, 60, (2, PROMPT))  # no <video> mark: the video goes right after the first token
    features = torch.randn(2, frames, 4, 8)
    context = vm.encode_video(features)
    return llm_flops(vm, ids, torch.ones_like(ids), context)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_llm_flops_grow_quadratically_with_visual_tokens(attn_implementation):
    vm = _llava(attn_implementation)
    lengths = {frames: PROMPT + 4 * frames for frames in (2, 6)}  # 4 visual tokens per frame
    f = {frames: _flops(vm, frames) for frames in lengths}
    (t1, l1), (t2, l2) = lengths.items()
    # f(L) = a·L + b·L² (projections and MLPs linear, attention scores and weighted sum quadratic):
    # f(L2)·L1 − f(L1)·L2 = b·L1·L2·(L2 − L1), with b = 2·2·hidden per layer (q·kᵀ and p·v, full L×L).
    quadratic = (f[t2] * l1 - f[t1] * l2) / (l1 * l2 * (l2 - l1))
    assert quadratic == 4 * HIDDEN * LAYERS


def test_sdpa_and_eager_attention_count_the_same_flops():
    assert _flops(_llava("sdpa"), 4) == _flops(_llava("eager"), 4)
