"""LinVT: a linear video tokenizer on top of an image/frame-level token adapter (papers/linvt.md §3).

Every video token LinVT emits is a weighted average of the frame tokens it was given, so an image-level
vision-language alignment (the frame projector) keeps working for video. The pipeline, per video:

1. **Frame tokens.** A llava-style projector (optional spatial pooling, a learned per-frame embedding, a 2-layer
   MLP) turns features (T, P, Dv) into frame tokens X (T, P', D) in the LLM's embedding space. It is the
   ``llava`` method's own code, so a saved ``llava`` adapter can be loaded into it
   (:meth:`LinvtMethod.init_projector_from`) and held fixed (``freeze_projector``).
2. **SVR, significance scoring.** ``scorer_layers`` layers of self-attention *within each frame* (sequence = the
   frame's P' tokens), then self-attention *across frames* (sequence = the T per-frame summaries, padded frames
   masked), broadcast back to the frame's tokens; a linear head gives one score per token.
3. **SVR, top-k.** The ``top_k`` highest-scoring real tokens of each video are kept, in temporal order. The scorer
   gets its gradient because the scores are log-weights wherever tokens are averaged (below): a token's weight
   in a pooled token and in the final aggregation grows with its score (selection itself is by index).
4. **SVR, multi-scale temporal pooling (Multi-C).** For each scale s with a window of w_s frames, the kept tokens
   at the same patch position in w_s consecutive frames are averaged with weights softmax(score); each scale's
   pooled tokens form their own sequence, in temporal order.
5. **TTA.** Per scale, ``scale_queries[s]`` learnable queries go through ``tta_layers`` blocks of self-attention,
   cross-attention to that scale's tokens, cross-attention to the question's LLM token embeddings (question
   only) and an FFN; each query's learned embedding is added again on the query side of every attention and of
   the final aggregation (``query_every_block``), so updates shared by all queries cannot merge them. The final
   aggregation forms weights over the scale's tokens and applies them to the tokens themselves: no value or
   output projection, every row of weights sums to one. The weights are ``W = Π + α_s (A − Π)``: A = softmax
   over tokens of ⟨query, key⟩/√d + score (the paper's query attention), Π = the *ordered selection*, which
   splits the scale's M tokens into ``n_s`` contiguous windows in temporal order (one token per window when
   M ≤ n_s) and averages each window with weights softmax(score).
   α_s = clamp(θ_s, 0, 1) for a learned scalar θ_s per scale started at ``attention_mix_init`` (1 = the paper's
   TTA alone; default 0.5, measured), so the weights are always non-negative: every output token is a convex
   combination of frame tokens.
6. The scales' outputs are concatenated: ``sum(scale_queries)`` tokens per video, whatever the number of frames.

What starting from a ``llava`` adapter guarantees (``init_projector_from``, which also sets α = 0): before any
training step, on a one-frame video with P' frame tokens, ``top_k ≥ P'`` and ``P' ≤ scale_queries[s]``, output
token i of scale s *is* the adapter's frame token ⌊i·P'/n_s⌋ (every frame token appears, in order, in every
scale). With P' > n_s, output token i is the score-weighted average of the frame tokens of its window.

Fixes over the public code (DESIGN.md): batch-first attention everywhere (spatial and temporal axes are never
swapped), a scorer that receives a gradient, a TTA self-attention over all queries of a scale (not a sequence of
length 1), each sample its own video, and ``generate`` goes through the same ``encode`` as ``forward``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Conditioning, LLMInfo, TokenContext, VideoMethod, register_method
from .blocks import Attention, sinusoid
from .llava import LlavaMethod

_MAX_TOKENS = 1 << 20


@dataclass
class LinvtOptions:
    hidden_dim: int = field(default=512, metadata={"help": "Width of the scorer and of the TTA queries.",
                                                    "min": 1, "max": 16384})
    num_heads: int = field(default=8, metadata={"help": "Attention heads in the scorer and TTA (paper: 8).",
                                                "min": 1, "max": 256})
    scorer_layers: int = field(default=4, metadata={"help": "SVR layers (within-frame then across-frame "
                                                            "attention each; paper: 4).", "min": 1, "max": 64})
    tta_layers: int = field(default=1, metadata={"help": "TTA blocks per scale (self-attention, visual and text "
                                                         "cross-attention, FFN).", "min": 1, "max": 64})
    top_k: int = field(default=2048, metadata={"help": "Tokens kept by the significance scores (paper: 2048); "
                                                       "capped by the video's real token count.",
                                               "min": 1, "max": _MAX_TOKENS})
    scale_windows: list[int] = field(
        default_factory=lambda: [1, 2, 4],
        metadata={"help": "Temporal pooling window (frames) of each scale, finest first.", "min": 1, "max": 16384})
    scale_queries: list[int] = field(
        default_factory=lambda: [64, 32, 16],
        metadata={"help": "Learnable queries (= output tokens) of each scale (paper: 64, 32, 16).",
                  "min": 1, "max": 16384})
    query_init_std: float = field(
        default=1.0,
        metadata={"help": "Standard deviation of the TTA queries at initialisation. At 0.02 the blocks' residual "
                          "updates swamp them: every query leaves the blocks as the same vector (cosine 0.98 at "
                          "birth, 0.99999 after training) and all output tokens share one attention row; 1 keeps "
                          "them apart (docs/results.md).", "min": 0.0, "max": 100.0})
    query_every_block: bool = field(
        default=True,
        metadata={"help": "Add each query's learned embedding again to the input of every TTA attention and of the "
                          "final aggregation (as DETR's decoder re-adds its query positions): the blocks' updates, "
                          "shared by all queries, cannot then merge them into one vector during training (demo "
                          "direction, three seeds: 88.0 without, 92.0 with; docs/results.md). Adapters saved before "
                          "this option existed load with it off.", "saved_before": False})
    scorer_reads_question: bool = field(
        default=False,
        metadata={"help": "Each SVR layer also cross-attends from every frame token to the question's LLM embeddings "
                          "(question only), so the significance scores, and with them the pooling and ordered "
                          "selection weights, can follow what is asked (the paper's SVR reads the video alone). "
                          "Demo, 32 frames, 2400 steps: direction 100 and 99 on seeds 0 and 2 (96 and 64 without, "
                          "at 1200 steps); at 1200 steps it swapped which seed failed (docs/results.md)."})
    ffn_mult: int = field(default=4, metadata={"help": "FFN width as a multiple of hidden_dim.", "min": 1, "max": 64})
    dropout: float = field(default=0.0, metadata={"help": "Attention dropout in the scorer and TTA.", "min": 0.0,
                                                  "lt": 1.0})
    attention_mix_init: float = field(
        default=0.5,
        metadata={"help": "Initial α of every scale in W = Π + α (A − Π): 1 = the queries' attention alone (the "
                          "paper's TTA), 0 = the ordered selection Π alone; 0 and 0.5 gave 71 and 65 on the demo's "
                          "direction question (one seed, docs/results.md). init_projector_from sets 0.",
                  "min": 0.0, "max": 1.0})
    spatial_pool: int = field(default=1, metadata={"help": "Frame projector: average-pool the square patch grid "
                                                           "by this stride (as llava's option).", "min": 1,
                                                   "max": 1024})
    temporal_embedding: bool = field(default=True, metadata={"help": "Frame projector: learned per-frame "
                                                                     "embedding (as llava's option)."})
    freeze_projector: bool = field(
        default=False,
        metadata={"help": "Hold the frame projector's MLP fixed (it keeps the alignment of the adapter it was "
                          "initialised from); the per-frame embedding still trains."})

    def __post_init__(self) -> None:
        self.scale_windows = [int(w) for w in self.scale_windows]
        self.scale_queries = [int(n) for n in self.scale_queries]
        if not self.scale_windows:
            raise ValueError("options.scale_windows: at least one scale is needed")
        if len(self.scale_windows) != len(self.scale_queries):
            raise ValueError(f"options.scale_queries: {len(self.scale_queries)} entries for "
                             f"{len(self.scale_windows)} scale_windows; give one query count per scale")
        if sum(self.scale_queries) > _MAX_TOKENS:
            raise ValueError(f"options.scale_queries: {sum(self.scale_queries)} output tokens in all is too many")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"options.num_heads: {self.num_heads} does not divide hidden_dim {self.hidden_dim}")


# ---- SVR: significance scoring ---------------------------------------------------------------------------------
@dataclass
class QuestionEmbeds:
    """The question's LLM token embeddings (B, L, D), layer-normed, and their mask (B, L). A row without question
    tokens attends to one placeholder position, and ``present`` (B,) is False there so that what it reads is zeroed."""

    embeds: torch.Tensor
    mask: torch.Tensor
    present: torch.Tensor

    @classmethod
    def build(cls, embeds: torch.Tensor, mask: torch.Tensor) -> "QuestionEmbeds":
        """From already-normed embeddings (B, L, D) and their bool mask (B, L)."""
        present = mask.any(dim=1)
        placeholder = torch.zeros_like(mask)
        placeholder[:, 0] = ~present
        return cls(embeds, mask | placeholder, present)

    def read(self, attention: nn.Module, queries: torch.Tensor) -> torch.Tensor:
        """``attention(queries, question)``, zeroed on rows without question tokens."""
        out = attention(queries, self.embeds, self.mask)
        return out * self.present[:, None, None].to(out.dtype)


class ScorerLayer(nn.Module):
    """Self-attention within each frame, then across frames over per-frame summaries, then an FFN.

    Tokens are (B, T, P, h). The spatial attention runs on B·T sequences of P tokens; the temporal attention on
    B sequences of T frame summaries (the mean of a frame's tokens plus its time position), whose result is added
    back to every token of the frame. No patch position enters, so permuting the patches of one frame permutes
    that frame's outputs and leaves every other frame's outputs unchanged.
    """

    def __init__(self, dim: int, heads: int, ffn_mult: int, dropout: float, text_dim: int | None = None) -> None:
        super().__init__()
        self.norm_spatial = nn.LayerNorm(dim)
        self.spatial = Attention(dim, heads, dropout)
        self.norm_temporal = nn.LayerNorm(dim)
        self.temporal = Attention(dim, heads, dropout)
        self.frame_to_tokens = nn.Linear(dim, dim)
        self.norm_text = nn.LayerNorm(dim) if text_dim is not None else None
        self.text = Attention(dim, heads, dropout, context_dim=text_dim) if text_dim is not None else None
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))

    def forward(self, x: torch.Tensor, frame_real: torch.Tensor, time: torch.Tensor,
                question: "QuestionEmbeds | None" = None) -> torch.Tensor:
        b, t, p, d = x.shape
        flat = self.norm_spatial(x).reshape(b * t, p, d)
        x = x + self.spatial(flat, flat).view(b, t, p, d)
        summary = self.norm_temporal(x.mean(dim=2)) + time  # (B, T, h)
        frames = self.temporal(summary, summary, frame_real)
        x = x + self.frame_to_tokens(frames)[:, :, None, :]
        if self.text is not None and question is not None:
            x = x + question.read(self.text, self.norm_text(x).reshape(b, t * p, d)).view(b, t, p, d)
        return x + self.ffn(self.norm_ffn(x))


class SignificanceScorer(nn.Module):
    """SVR's spatio-temporal significance scores: frame tokens (B, T, P, D) → one score per token (B, T, P)."""

    def __init__(self, in_dim: int, dim: int, heads: int, layers: int, ffn_mult: int, dropout: float,
                 text_dim: int | None = None) -> None:
        super().__init__()
        self.input_proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, dim))
        self.layers = nn.ModuleList(ScorerLayer(dim, heads, ffn_mult, dropout, text_dim) for _ in range(layers))
        self.norm_out = nn.LayerNorm(dim, bias=False)
        # No biases here: every use of the scores (softmax weights) ignores a shift shared by all tokens. Small first
        # scores: the aggregation starts close to content attention and the pooling close to a mean.
        self.head = nn.Linear(dim, 1, bias=False)
        nn.init.normal_(self.head.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, frame_real: torch.Tensor,
                question: "QuestionEmbeds | None" = None) -> torch.Tensor:
        x = self.input_proj(tokens)
        time = sinusoid(torch.arange(x.shape[1], device=x.device), x.shape[-1]).to(x.dtype)[None]
        for layer in self.layers:
            x = layer(x, frame_real, time, question)
        return self.head(self.norm_out(x)).squeeze(-1)


def select_top_k(scores: torch.Tensor, token_real: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) bool: the min(k, real count) highest-scoring real tokens of each row (selection by index only)."""
    k = min(k, scores.shape[1])
    with torch.no_grad():
        ranked = scores.detach().masked_fill(~token_real, float("-inf"))
        kept = ranked.topk(k, dim=1).indices
        selected = torch.zeros_like(token_real)
        selected.scatter_(1, kept, True)
    return selected & token_real


# ---- SVR: multi-scale temporal pooling -------------------------------------------------------------------------
@dataclass
class ScaleTokens:
    """One scale's pooled tokens, compacted in temporal order (t', p); row b has ``mask[b].sum()`` real ones.

    Pooled token m of row b is ``sum_u weight[b, m, u] * frame_tokens[b, index[b, m, u]]`` (index into the
    flattened T·P' frame tokens; weights over u sum to one for a real token, are 0 for padding).
    """

    index: torch.Tensor  # (B, M, w) long
    weight: torch.Tensor  # (B, M, w)
    score: torch.Tensor  # (B, M): log-sum-exp of the pooled tokens' scores
    time: torch.Tensor  # (B, M): centre frame of the window
    mask: torch.Tensor  # (B, M) bool

    def gather(self, frame_tokens: torch.Tensor) -> torch.Tensor:
        """The pooled tokens (B, M, D) from the flattened frame tokens (B, T·P', D)."""
        b, m, w = self.index.shape
        picked = frame_tokens.gather(1, self.index.reshape(b, m * w, 1).expand(-1, -1, frame_tokens.shape[-1]))
        return (picked.view(b, m, w, -1) * self.weight[..., None].to(picked.dtype)).sum(dim=2)


def pool_in_time(scores: torch.Tensor, selected: torch.Tensor, window: int) -> ScaleTokens:
    """Average the selected tokens at each patch position over windows of ``window`` consecutive frames.

    scores, selected: (B, T, P). A window's weights are softmax(score) over its selected tokens; a (window, patch)
    with no selected token is not a pooled token. Frames past T (when T is not a multiple of the window) count as
    unselected.
    """
    b, t, p = scores.shape
    t_out = -(-t // window)
    pad = t_out * window - t
    if pad:
        scores = F.pad(scores, (0, 0, 0, pad))
        selected = F.pad(selected, (0, 0, 0, pad), value=False)
    s = scores.view(b, t_out, window, p).transpose(2, 3)  # (B, T', P, w)
    m = selected.view(b, t_out, window, p).transpose(2, 3)
    valid = m.any(dim=-1)  # (B, T', P)
    # Empty windows get finite logits (their weights are zeroed below), so no NaN reaches the backward pass.
    logits = s.masked_fill(~m, float("-inf")).masked_fill(~valid[..., None], 0.0)
    weight = torch.softmax(logits, dim=-1) * m
    score = torch.logsumexp(logits, dim=-1)
    frame = torch.arange(t_out, device=scores.device)[:, None] * window + torch.arange(window, device=scores.device)
    index = frame.clamp(max=t - 1)[:, None, :] * p + torch.arange(p, device=scores.device)[None, :, None]  # (T', P, w)
    centre = (torch.arange(t_out, device=scores.device, dtype=torch.float32) * window + (window - 1) / 2)
    # Compact the real pooled tokens to the front of each row, keeping their (t', p) order.
    valid = valid.reshape(b, t_out * p)
    count = valid.sum(dim=1)
    width = int(count.max())
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :width]
    mask = torch.arange(width, device=scores.device)[None, :] < count[:, None]
    index = index.reshape(t_out * p, window)[order]  # (B, M, w)
    weight = weight.reshape(b, t_out * p, window).gather(1, order[..., None].expand(-1, -1, window))
    weight = weight * mask[..., None]
    score = score.reshape(b, t_out * p).gather(1, order)
    time = centre[:, None].expand(t_out, p).reshape(t_out * p)[order]
    return ScaleTokens(index, weight, score, time, mask)


# ---- TTA: text-conditioned token aggregation --------------------------------------------------------------------
class TextConditionedQueryBlock(nn.Module):
    """Pre-norm residual block: self-attention of the queries, cross-attention to the visual tokens, cross-attention
    to the question's LLM embeddings (a row without question tokens skips it), FFN."""

    def __init__(self, dim: int, text_dim: int, heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dropout)
        self.norm_visual_query = nn.LayerNorm(dim)
        self.norm_visual = nn.LayerNorm(dim)
        self.visual_attn = Attention(dim, heads, dropout)
        self.norm_text_query = nn.LayerNorm(dim)
        self.text_attn = Attention(dim, heads, dropout, context_dim=text_dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))

    def forward(self, queries: torch.Tensor, visual: torch.Tensor, visual_mask: torch.Tensor,
                question: QuestionEmbeds, identity: torch.Tensor | None = None) -> torch.Tensor:
        """``identity``: (slots, dim) added to every attention's query side (and the self-attention's keys)."""
        h = _with_identity(self.norm_self(queries), identity)
        queries = queries + self.self_attn(h, h)
        queries = queries + self.visual_attn(_with_identity(self.norm_visual_query(queries), identity),
                                             self.norm_visual(visual), visual_mask)
        queries = queries + question.read(self.text_attn, _with_identity(self.norm_text_query(queries), identity))
        return queries + self.ffn(self.norm_ffn(queries))


def _with_identity(h: torch.Tensor, identity: torch.Tensor | None) -> torch.Tensor:
    """``h`` (B, slots, dim) plus each query's own learned embedding (slots, dim), when given."""
    return h if identity is None else h + identity.to(h.dtype)


def ordered_selection(mask: torch.Tensor, score: torch.Tensor, slots: int) -> torch.Tensor:
    """Π (B, slots, M): slot i averages window i of the row's M real tokens with weights softmax(score).

    Windows are contiguous in token order: [⌊iM/n⌋, max(⌊(i+1)M/n⌋, ⌊iM/n⌋ + 1)), a partition when M ≥ n and a
    single token (⌊iM/n⌋) each when M < n.
    """
    count = mask.sum(dim=1)[:, None]  # (B, 1)
    i = torch.arange(slots, device=mask.device)[None, :]
    start = i * count // slots
    end = torch.maximum((i + 1) * count // slots, start + 1)
    j = torch.arange(mask.shape[1], device=mask.device)[None, None, :]
    inside = (j >= start[..., None]) & (j < end[..., None])  # (B, n, M)
    logits = score[:, None, :].expand_as(inside).masked_fill(~inside, float("-inf"))
    return torch.softmax(logits, dim=-1)


class ScaleAggregator(nn.Module):
    """TTA of one scale: its own queries and blocks, and the final aggregation over that scale's tokens."""

    def __init__(self, slots: int, dim: int, text_dim: int, heads: int, layers: int, ffn_mult: int,
                 dropout: float, query_init_std: float, query_every_block: bool) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(slots, dim) * query_init_std)
        self.query_every_block = query_every_block
        self.blocks = nn.ModuleList(
            TextConditionedQueryBlock(dim, text_dim, heads, ffn_mult, dropout) for _ in range(layers)
        )
        self.norm_out = nn.LayerNorm(dim)
        # The key side has no bias: a shift shared by all keys changes no softmax weight (it would never train).
        self.norm_keys = nn.LayerNorm(dim, bias=False)
        self.to_query = nn.Linear(dim, dim)
        self.to_key = nn.Linear(dim, dim, bias=False)

    def transformed_queries(self, visual: torch.Tensor, scale: ScaleTokens, question: QuestionEmbeds) -> torch.Tensor:
        """The queries (B, slots, dim) after the TTA blocks, before the final aggregation."""
        q = self.queries[None].expand(visual.shape[0], -1, -1).to(visual.dtype)
        for block in self.blocks:
            q = block(q, visual, scale.mask, question, self._identity)
        return q

    @property
    def _identity(self) -> torch.Tensor | None:
        """The queries' own embeddings, re-added at every attention (``query_every_block``), or None."""
        return self.queries if self.query_every_block else None

    def forward(self, visual: torch.Tensor, scale: ScaleTokens, question: QuestionEmbeds,
                mix: torch.Tensor) -> torch.Tensor:
        """Aggregation weights W (B, slots, M) over the scale's tokens; rows sum to one."""
        q = self.transformed_queries(visual, scale, question)
        keys = self.to_key(self.norm_keys(visual))
        query = self.to_query(_with_identity(self.norm_out(q), self._identity))
        logits = query @ keys.transpose(1, 2) / math.sqrt(q.shape[-1])
        logits = (logits + scale.score[:, None, :].to(logits.dtype)).masked_fill(~scale.mask[:, None, :],
                                                                                  float("-inf"))
        attention = torch.softmax(logits, dim=-1)
        prior = ordered_selection(scale.mask, scale.score, q.shape[1]).to(attention.dtype)
        return prior + mix.to(attention.dtype) * (attention - prior)


def clamp_straight_through(raw: torch.Tensor) -> torch.Tensor:
    """clamp(raw, 0, 1) whose gradient is the identity's: the value keeps the aggregation convex, and ``raw``
    keeps learning after it leaves [0, 1] (a plain clamp would hold it outside, without gradient, for good)."""
    return raw + (raw.clamp(0.0, 1.0) - raw).detach()


# ---- the method -------------------------------------------------------------------------------------------------
@dataclass
class LinvtOutput:
    """Everything LinVT computed for a batch; ``tokens`` is what the LLM reads."""

    tokens: torch.Tensor  # (B, N, D), N = sum(scale_queries)
    frame_tokens: torch.Tensor  # (B, T·P', D): the projector's frame tokens (the inputs of SVR/TTA)
    frame_mask: torch.Tensor  # (B, T·P') bool: tokens of real frames
    scores: torch.Tensor  # (B, T, P'): significance scores
    selected: torch.Tensor  # (B, T, P') bool: the top-k kept tokens
    scales: list[ScaleTokens]
    aggregation: list[torch.Tensor]  # per scale (B, n_s, M_s)

    def weights(self) -> torch.Tensor:
        """(B, N, T·P'): tokens = weights @ frame_tokens, composed from the pooling and the aggregation weights."""
        b, n_in = self.frame_tokens.shape[:2]
        rows = []
        for scale, agg in zip(self.scales, self.aggregation):
            m, w = scale.index.shape[1:]
            dense = agg.new_zeros(b, agg.shape[1], n_in)
            combined = (agg[..., None] * scale.weight[:, None].to(agg.dtype)).reshape(b, agg.shape[1], m * w)
            index = scale.index.reshape(b, 1, m * w).expand(-1, agg.shape[1], -1)
            rows.append(dense.scatter_add(2, index, combined))
        return torch.cat(rows, dim=1)


@register_method
class LinvtMethod(VideoMethod):
    """LinVT: sum(scale_queries) tokens per video, each a weighted average of the video's frame tokens."""

    name = "linvt"
    kind = "tokens"
    Options = LinvtOptions
    needs = frozenset({"prompt", "prompt_embeds"})

    def __init__(self, config, llm: LLMInfo) -> None:
        super().__init__(config, llm)
        opt = self.options
        d, h = llm.hidden_size, opt.hidden_dim
        self.frame_tokenizer = LlavaMethod(self._frame_tokenizer_config(), llm)
        if opt.freeze_projector:
            hold_as_buffers(self.frame_tokenizer.projector)
        self.scorer = SignificanceScorer(d, h, opt.num_heads, opt.scorer_layers, opt.ffn_mult, opt.dropout,
                                         text_dim=d if opt.scorer_reads_question else None)
        self.token_proj = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, h))
        self.text_norm = nn.LayerNorm(d)
        self.aggregators = nn.ModuleList(
            ScaleAggregator(n, h, d, opt.num_heads, opt.tta_layers, opt.ffn_mult, opt.dropout, opt.query_init_std,
                            opt.query_every_block)
            for n in opt.scale_queries
        )
        # θ per scale; the aggregation uses α = clamp(θ, 0, 1) (see ``mix``).
        self.attention_mix = nn.Parameter(torch.full((len(opt.scale_queries),), float(opt.attention_mix_init)))

    def _frame_tokenizer_config(self):
        from ..config import VideoAdapterConfig

        return VideoAdapterConfig(method="llava", num_frames=self.config.num_frames,
                                  vision_hidden_size=self.vision_width,
                                  options={"spatial_pool": self.options.spatial_pool,
                                           "temporal_embedding": self.options.temporal_embedding})

    @property
    def num_output_tokens(self) -> int:
        return sum(self.options.scale_queries)

    @property
    def mix(self) -> torch.Tensor:
        """α per scale in W = Π + α (A − Π): 0 = ordered selection, 1 = the queries' attention."""
        return clamp_straight_through(self.attention_mix)

    # ---- encoding ------------------------------------------------------------------------------------------------
    def encode(self, features: torch.Tensor, frame_mask: torch.Tensor | None = None,
               cond: Conditioning | None = None) -> TokenContext:
        return TokenContext(self.tokenize(features, frame_mask, cond).tokens)

    def tokenize(self, features: torch.Tensor, frame_mask: torch.Tensor | None = None,
                 cond: Conditioning | None = None) -> LinvtOutput:
        """Run LinVT and keep every intermediate (scores, selection, pooling and aggregation weights)."""
        features, frame_mask, text, text_mask = self._inputs(features, frame_mask, cond)
        b, t = features.shape[:2]
        frame_tokens = self.frame_tokenizer.encode(features).embeds  # (B, T·P', D)
        p = frame_tokens.shape[1] // t
        frame_real = torch.ones(b, t, dtype=torch.bool, device=features.device) if frame_mask is None \
            else frame_mask.to(device=features.device, dtype=torch.bool)
        if not bool(frame_real.any(dim=1).all()):
            raise ValueError("frame_mask: every video needs at least one real frame")
        token_real = frame_real[:, :, None].expand(b, t, p)
        question = self.question_embeds(text, text_mask)
        scores = self.scorer(frame_tokens.view(b, t, p, -1), frame_real, question)
        selected = select_top_k(scores.reshape(b, t * p), token_real.reshape(b, t * p), self.options.top_k)
        selected = selected.view(b, t, p)

        outputs, scales, weights = [], [], []
        mix = self.mix
        for s, (window, aggregator) in enumerate(zip(self.options.scale_windows, self.aggregators)):
            scale = pool_in_time(scores, selected, window)
            pooled = scale.gather(frame_tokens)  # (B, M, D)
            time = sinusoid(scale.time, self.options.hidden_dim).to(pooled.dtype)
            visual = self.token_proj(pooled) + time
            agg = aggregator(visual, scale, question, mix[s])
            outputs.append(agg.to(pooled.dtype) @ pooled)
            scales.append(scale)
            weights.append(agg)
        return LinvtOutput(torch.cat(outputs, dim=1), frame_tokens, token_real.reshape(b, t * p), scores,
                           selected, scales, weights)

    def question_embeds(self, text: torch.Tensor, text_mask: torch.Tensor) -> QuestionEmbeds:
        """The question's LLM embeddings (B, L, D) and bool mask (B, L) as the scorer and TTA read them."""
        return QuestionEmbeds.build(self.text_norm(text), text_mask)

    def _inputs(self, features: torch.Tensor, frame_mask: torch.Tensor | None, cond: Conditioning | None):
        """Features and frame mask, expanded to the question batch when one video serves several questions, and
        the question's embeddings (B, L, D) with their mask (B, L); an empty question when none is given."""
        if features.dim() != 4:
            raise ValueError(f"videos: expected features (B, T, P, Dv), got shape {tuple(features.shape)}")
        prompt = cond.prompt if cond is not None else None
        if prompt is None or prompt.embeds is None:
            b = features.shape[0]
            text = features.new_zeros(b, 1, self.llm_info.hidden_size)
            return features, frame_mask, text, torch.zeros(b, 1, dtype=torch.bool, device=features.device)
        text, text_mask = prompt.embeds, prompt.mask.to(device=features.device, dtype=torch.bool)
        b_video, b_text = features.shape[0], text.shape[0]
        if b_video == 1 and b_text > 1:
            features = features.expand(b_text, *features.shape[1:])
            frame_mask = None if frame_mask is None else frame_mask.expand(b_text, -1)
        elif b_video != b_text:
            raise ValueError(f"videos: {b_video} video(s) for a question batch of {b_text}")
        return features, frame_mask, text.to(features.dtype), text_mask

    # ---- starting from a frame adapter ------------------------------------------------------------------------
    @torch.no_grad()
    def init_projector_from(self, directory: str | Path, *, reproduce_frames: bool = True) -> None:
        """Load the frame projector of a saved ``llava`` adapter (safetensors + JSON, checked).

        The adapter must read features of this width, produce tokens of this LLM's width and use the same
        ``spatial_pool`` and ``temporal_embedding``. Its per-frame embedding rows are copied; frames past its
        ``num_frames`` start from its last row. With ``reproduce_frames`` (default) every scale's α is set to 0,
        so that before training a one-frame video gives the adapter's own frame tokens (see the module docstring).
        Raises ValueError (naming the directory and the difference) when the adapter does not fit.
        """
        from ..serialization import AdapterMismatchError, check_state, read_adapter

        directory = Path(directory)
        loaded = read_adapter(directory)
        where = f"init_projector_from: {directory}"
        if loaded.config.method != "llava":
            raise ValueError(f"{where} holds a {loaded.config.method!r} adapter; expected a 'llava' frame adapter")
        if loaded.config.vision_hidden_size != self.vision_width:
            raise ValueError(f"{where} reads features {loaded.config.vision_hidden_size} wide; this adapter reads "
                             f"{self.vision_width}")
        base = loaded.fingerprint
        if base.hidden_size != self.llm_info.hidden_size or (
                self.llm_info.model_type and base.model_type != self.llm_info.model_type):
            raise AdapterMismatchError(
                f"{where} was trained on a {base.model_type} LLM of width {base.hidden_size}; this one is "
                f"{self.llm_info.model_type or '?'} of width {self.llm_info.hidden_size}")
        for key in ("spatial_pool", "temporal_embedding"):
            theirs, mine = loaded.config.options.get(key), getattr(self.options, key)
            if theirs != mine:
                raise ValueError(f"options.{key}: {mine!r} here but the llava adapter at {directory} uses {theirs!r};"
                                 f" set options {key}={theirs!r}")
        own = self.frame_tokenizer.state_dict()
        state = dict(loaded.state)
        if "temporal.weight" in state and "temporal.weight" in own:
            state["temporal.weight"] = _extend_rows(state["temporal.weight"], own["temporal.weight"].shape[0])
        check_state(own, state, str(directory))
        for name, tensor in own.items():
            tensor.copy_(state[name].to(device=tensor.device, dtype=tensor.dtype))
        if reproduce_frames:
            self.attention_mix.zero_()


def _extend_rows(table: torch.Tensor, rows: int) -> torch.Tensor:
    """The first ``rows`` rows of ``table``; missing rows repeat its last one."""
    if table.shape[0] >= rows:
        return table[:rows]
    return torch.cat([table, table[-1:].expand(rows - table.shape[0], -1)])


def hold_as_buffers(module: nn.Module) -> None:
    """Turn every parameter of ``module`` into a buffer of the same name: saved and loaded with the state dict,
    moved by ``.to()``, never trained (a training stage that sets ``requires_grad`` on parameters cannot reach it)."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            del sub._parameters[name]
            sub.register_buffer(name, param.detach().clone())
