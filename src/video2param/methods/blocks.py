"""Building blocks shared by the methods: attention with its own context width, query blocks, positions.

ViPE, LinVT and Video2LoRA all let a small set of learned queries read a longer sequence (video tokens, prompt
embeddings, LLM hidden states). The pieces they share live here, so each method file only says how it wires them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sinusoidal embedding of (integer or fractional) positions: (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.float()[..., None] * freqs
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return F.pad(emb, (0, dim - 2 * half))


def spacetime_positions(frames: int, patches: int, dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, P, dim) sinusoidal positions: the first half of the channels encode the frame, the rest the patch."""
    t = torch.arange(frames, device=device)
    p = torch.arange(patches, device=device)
    time = sinusoid(t, dim // 2)[:, None, :].expand(frames, patches, -1)
    space = sinusoid(p, dim - dim // 2)[None, :, :].expand(frames, patches, -1)
    return torch.cat([time, space], dim=-1)


class Attention(nn.Module):
    """Multi-head attention of ``x`` (B, N, dim) over ``context`` (B, M, context_dim), batch first.

    ``context_mask`` (B, M) is True for tokens that may be attended. The context may have a width of its own
    (``context_dim``), e.g. LLM embeddings read by queries of a smaller module.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, context_dim: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"num_heads: {heads} does not divide the width {dim}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if context_mask is None else context_mask[:, None, None, :].bool()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class QueryBlock(nn.Module):
    """Pre-norm residual block for learned queries: self-attention, cross-attention to a context, FFN."""

    def __init__(self, dim: int, heads: int, ffn_mult: int = 4, dropout: float = 0.0,
                 context_dim: int | None = None) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dropout)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_video = nn.LayerNorm(context_dim or dim)
        self.cross_attn = Attention(dim, heads, dropout, context_dim=context_dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))

    def forward(self, queries: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        h = self.norm_self(queries)
        queries = queries + self.self_attn(h, h)
        queries = queries + self.cross_attn(self.norm_cross(queries), self.norm_video(context), context_mask)
        return queries + self.ffn(self.norm_ffn(queries))


class FrameProjector(nn.Module):
    """Per-token projection of video features (B, T, P, Dv) → (B, T, P, dim) with frame and patch positions.

    Sinusoidal time and space positions are fixed; a learned per-frame vector is added on top so order and timing
    stay visible to whatever reads the tokens next.
    """

    def __init__(self, in_dim: int, dim: int, max_frames: int) -> None:
        super().__init__()
        self.input_proj = nn.Sequential(nn.Linear(in_dim, dim), nn.LayerNorm(dim))
        self.frame_embedding = nn.Embedding(max_frames, dim)
        nn.init.normal_(self.frame_embedding.weight, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return project_frames(features, self.input_proj, self.frame_embedding)


def project_frames(features: torch.Tensor, input_proj: nn.Module, frame_embedding: nn.Embedding) -> torch.Tensor:
    """``input_proj(features)`` plus sinusoidal frame/patch positions and the learned per-frame vector."""
    _, t, p, _ = features.shape
    if t > frame_embedding.num_embeddings:
        raise ValueError(
            f"videos: {t} frames but the adapter was built for at most num_frames={frame_embedding.num_embeddings}"
        )
    x = input_proj(features)
    pos = spacetime_positions(t, p, x.shape[-1], device=x.device).to(x.dtype)
    return x + pos + frame_embedding.weight[:t, None, :].to(x.dtype)


def token_mask_from_frames(frame_mask: torch.Tensor | None, batch: int, frames: int, patches: int,
                           device: torch.device) -> torch.Tensor:
    """(B, T·P) bool token mask from a (B, T) frame mask (None = every frame real)."""
    if frame_mask is None:
        return torch.ones((batch, frames * patches), dtype=torch.bool, device=device)
    return frame_mask.bool()[:, :, None].expand(batch, frames, patches).reshape(batch, frames * patches)


class SwiGLU(nn.Module):
    """Gated feed-forward ``W_out(silu(W_gate x) · W_up x)``: ``dim → hidden → out_dim`` (bias-free, as in Llama)."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.out = nn.Linear(hidden, out_dim or dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.gate(x)) * self.up(x))


class PerceiverAttention(nn.Module):
    """Idefics2-style Perceiver cross-attention with grouped key/value heads.

    Queries come from the latents (B, N, dim); keys and values from ``context`` (B, M, dim), followed by the
    latents themselves when ``attend_to_self`` (keys/values = context ++ latents, so the latents also see each other
    without a separate self-attention). ``heads`` query heads of ``head_dim`` share ``kv_heads`` key/value heads;
    the attention width ``heads · head_dim`` may differ from ``dim``. Bias-free projections.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, kv_heads: int, attend_to_self: bool = True) -> None:
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"kv_heads: {kv_heads} does not divide the {heads} query heads")
        self.heads, self.head_dim, self.kv_heads = heads, head_dim, kv_heads
        self.attend_to_self = attend_to_self
        self.q = nn.Linear(dim, heads * head_dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, latents: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = latents.shape
        memory = torch.cat([context, latents], dim=1) if self.attend_to_self else context
        m = memory.shape[1]
        q = self.q(latents).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(memory).view(b, m, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(memory).view(b, m, self.kv_heads, self.head_dim).transpose(1, 2)
        group = self.heads // self.kv_heads
        if group > 1:  # each key/value head serves `group` query heads
            k = k[:, :, None].expand(b, self.kv_heads, group, m, self.head_dim).reshape(b, self.heads, m, -1)
            v = v[:, :, None].expand(b, self.kv_heads, group, m, self.head_dim).reshape(b, self.heads, m, -1)
        mask = None
        if context_mask is not None:
            mask = context_mask.bool()
            if self.attend_to_self:
                mask = torch.cat([mask, mask.new_ones(b, n)], dim=1)
            mask = mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class PerceiverBlock(nn.Module):
    """One Perceiver resampler layer (Idefics2 style): RMSNorm on latents and context → cross-attention over
    context ++ latents → residual; RMSNorm → SwiGLU FFN → residual. No separate self-attention."""

    def __init__(self, dim: int, heads: int, head_dim: int, kv_heads: int, ffn_mult: int = 4,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.norm_latents = nn.RMSNorm(dim, eps=eps)
        self.norm_context = nn.RMSNorm(dim, eps=eps)
        self.attn = PerceiverAttention(dim, heads, head_dim, kv_heads, attend_to_self=True)
        self.norm_ffn = nn.RMSNorm(dim, eps=eps)
        self.ffn = SwiGLU(dim, ffn_mult * dim)

    def forward(self, latents: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        latents = latents + self.attn(self.norm_latents(latents), self.norm_context(context), context_mask)
        return latents + self.ffn(self.norm_ffn(latents))
