"""Shared fixtures: tiny random LMs, a word tokenizer, random video features. Everything offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from tiny_models import make_tiny_lm

WORDS = "what colour is the object shape which way does it move ? answer red green blue left right up down".split()
DV = 16  # width of the random video features used by the core tests


@pytest.fixture
def tokenizer():
    from video2param.data.tokenizer import build_word_tokenizer

    return build_word_tokenizer(WORDS)


@pytest.fixture
def llama(tokenizer):
    return make_tiny_lm("llama", vocab_size=len(tokenizer) + 8)


def random_features(batch: int, frames: int = 4, patches: int = 4, dim: int = DV, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, patches, dim, generator=g)


def encode(tokenizer, texts: list[str], padding_side: str = "left"):
    tokenizer.padding_side = padding_side
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]
