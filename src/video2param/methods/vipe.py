"""ViPE: the video as low-rank perceptual weights inside the LLM (papers/vipe.md §3).

Visual Injection Module: N = rank learnable perceptual queries pass through pre-norm residual blocks of
self-attention, cross-attention to the video features, and FFN. Hierarchical Context Merging (HCM): before each
block's cross-attention, the visual tokens most similar to some query (r_j = max_i cos(Q_i, V_j)) are dropped, so
later blocks look at what the queries have not absorbed yet; the dropped tokens stay dropped for the later blocks.
Perceptual weights: for every injected layer and role, a projection Dv → d_in turns the N queries into
W_v (d_in × r) (our A = W_vᵀ, per video); W_l (r × d_out) is a learned, zero-initialised static matrix shared by all
videos (our B = W_lᵀ); the delta W_v W_l is scaled by alpha / r. Zero W_l makes a fresh adapter the identity.
Temporal and spatial sinusoidal positions (plus a learned per-frame embedding) are added to the video features so
the queries can tell frame order and where things are.

Training speed of the generated factors (docs/vipe-training.md): the W_v projections and W_l are trained through
fixed multipliers (``GeneratorScaling``), so that under Adam each entry of a generated A moves about as fast as a
LoRA's A and W_l a little slower than a LoRA's B. Without them the A generator, whose input is a LayerNorm output
of width hidden_dim, moves A ~hidden_dim times faster than a LoRA A: the video-independent part of the delta
swamps the video's and training collapses to the answer prior at learning rates ≥ 1e-3. Saved tensors are always
the effective matrices, so the multipliers never change the adapter format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .base import Conditioning, LLMInfo, LowRank, VideoMethod, WeightContext, register_method
from .blocks import QueryBlock, project_frames, token_mask_from_frames


#: The paper's injection-module width (for 4096-wide LLMs); the default width never exceeds it.
PAPER_HIDDEN_DIM = 512


@dataclass
class VipeOptions:
    hidden_dim: int | None = field(
        default=None,
        metadata={"help": "Width Dv of the injection module. None: the LLM's hidden size, capped at 512 (the paper's "
                          "width, for 4096-wide LLMs) and rounded down to a multiple of num_heads. A module wider "
                          "than the LLM it writes into costs more than the LLM itself (a 512-wide module on a 96-wide "
                          "LM took 77% of a training step) without widening the deltas.", "min": 1},
    )
    depth: int = field(default=3, metadata={"help": "Number of injection blocks (self-attn, cross-attn, FFN)."})
    num_heads: int = field(default=8, metadata={"help": "Attention heads in the injection blocks."})
    keep_ratios: list[float] | None = field(
        default=None,
        metadata={"help": "HCM: fraction of the remaining visual tokens each block keeps (one per block). Default "
                          "1.0 for the first block then dropping so the last block sees 60% of the tokens (the "
                          "paper's stable setting)."},
    )
    merge: bool = field(default=True, metadata={"help": "HCM on/off. Off: every block attends to every token."})
    ffn_mult: int = field(default=4, metadata={"help": "FFN width as a multiple of hidden_dim."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout in the injection blocks."})
    query_init_std: float = field(
        default=1.0,
        metadata={"help": "Standard deviation of the perceptual queries at initialisation. At 0.02 the blocks' "
                          "residual updates swamp them: the r queries leave the blocks as one vector, so the "
                          "video-dependent part of every delta has rank ~1 (cosine 0.9997 between queries after "
                          "training); 1 keeps them apart (docs/results.md).", "min": 0.0, "max": 100.0})
    a_lr_ratio: float = field(
        default=1.0,
        metadata={"help": "How fast the generated A (= W_vᵀ) moves under Adam, relative to a LoRA's A at the same "
                          "learning rate. The W_v projections are trained as (a_lr_ratio / hidden_dim) · P, the "
                          "multiplier rounded to a power of two: 1.0 moves each entry of A by about lr per step, as "
                          "for a LoRA A. The original parametrisation is a_lr_ratio = hidden_dim; it collapses at "
                          "lr >= 1e-3 (docs/vipe-training.md).", "gt": 0},
    )
    w_l_lr_ratio: float = field(
        default=1.0,
        metadata={"help": "Learning-rate multiplier of the shared W_l (= Bᵀ), applied by training it as "
                          "w_l_lr_ratio · P (rounded to a power of two), so every optimizer gets it: exact for "
                          "Adam-type optimizers, squared for plain SGD. Below 1 the static, video-independent part "
                          "of the delta grows slower than the video's. With queries at std 1, 1 reached 95% in as "
                          "few steps as 1/8 or fewer at every point of the sweep in docs/vipe-training.md, and on the "
                          "demo's three seeds 1/8 fell to 78% overall against 97.6% (docs/results.md).", "gt": 0},
    )

    def __post_init__(self) -> None:
        for name in ("depth", "num_heads", "ffn_mult"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"options.{name}: expected an integer >= 1, got {value!r}")
        if self.hidden_dim is not None and self.hidden_dim % self.num_heads:
            raise ValueError(f"options.num_heads: {self.num_heads} does not divide hidden_dim {self.hidden_dim}")
        if self.keep_ratios is None:
            self.keep_ratios = default_keep_ratios(self.depth)
        self.keep_ratios = [float(r) for r in self.keep_ratios]
        if len(self.keep_ratios) != self.depth:
            raise ValueError(f"options.keep_ratios: {len(self.keep_ratios)} ratios for depth {self.depth}")
        if any(not 0.0 < r <= 1.0 for r in self.keep_ratios):
            raise ValueError(f"options.keep_ratios: each ratio must be in (0, 1], got {self.keep_ratios}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"options.dropout: expected a value in [0, 1), got {self.dropout!r}")
        for name in ("a_lr_ratio", "w_l_lr_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"options.{name}: expected a positive finite number, got {value!r}")

    def resolved_hidden_dim(self, llm_hidden_size: int) -> int:
        """``hidden_dim``, or the default width for an LLM of ``llm_hidden_size`` (see the option's help)."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        width = min(PAPER_HIDDEN_DIM, llm_hidden_size) // self.num_heads * self.num_heads
        return max(width, self.num_heads)


def default_keep_ratios(depth: int, final: float = 0.6) -> list[float]:
    """First block sees everything; the others drop evenly so the last keeps ``final`` of the tokens."""
    if depth == 1:
        return [1.0]
    step = final ** (1.0 / (depth - 1))
    return [1.0] + [round(step, 6)] * (depth - 1)


def hierarchical_merge(queries: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor | None,
                       keep_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop the tokens already absorbed by the queries (HCM, papers/vipe.md eq. 9–10).

    queries (B, N, D), tokens (B, M, D), token_mask (B, M) True = real. For each sample, r_j = max_i cos(Q_i, V_j)
    over its real tokens; the ``round(n_real * (1 - keep_ratio))`` tokens of highest r_j are dropped. Returns the
    kept tokens (B, M', D) in their original order, their mask (B, M') and their indices into ``tokens`` (B, M').
    Padding is never kept as a real token.
    """
    b, m, _ = tokens.shape
    if token_mask is None:
        token_mask = torch.ones((b, m), dtype=torch.bool, device=tokens.device)
    n_real = token_mask.sum(dim=1)
    n_keep = torch.clamp(torch.round(n_real.float() * keep_ratio).long(), min=1)
    n_keep = torch.minimum(n_keep, n_real)
    with torch.no_grad():  # selection by index: the attention over the kept tokens carries the gradient
        sim = F.normalize(queries.float(), dim=-1) @ F.normalize(tokens.float(), dim=-1).transpose(1, 2)
        relevance = sim.max(dim=1).values  # (B, M)
        # Ascending order: least-absorbed real tokens first, padding last.
        relevance = relevance.masked_fill(~token_mask, float("inf"))
        order = torch.argsort(relevance, dim=1, stable=True)
        width = int(n_keep.max())
        kept = order[:, :width]
        kept_mask = torch.arange(width, device=tokens.device)[None, :] < n_keep[:, None]
        # Restore temporal/spatial order among the kept tokens (padding slots sort to the end).
        sort_key = kept.masked_fill(~kept_mask, m)
        kept = kept.gather(1, torch.argsort(sort_key, dim=1))
    kept_tokens = tokens.gather(1, kept[..., None].expand(-1, -1, tokens.shape[-1]))
    return kept_tokens, kept_mask, kept


def nearest_power_of_two(value: float) -> float:
    """2 ** round(log2(value)): multiplying and dividing by it is exact, so save → load is bit-exact."""
    return 2.0 ** round(math.log2(value))


@dataclass(frozen=True)
class GeneratorScaling:
    """Fixed multipliers between the trained parameters P and the effective W_v projection / W_l: W = m · P.

    An Adam step moves each entry of P by about lr whatever its gradient's size, so it moves W by m · lr: m sets the
    effective learning rate for any Adam-type optimizer, without per-group settings. State dicts hold W (the
    effective matrices) under the usual keys; ``to_state`` / ``from_state`` convert.
    """

    to_A: float
    W_l: float

    @classmethod
    def from_options(cls, options: VipeOptions, hidden_dim: int) -> "GeneratorScaling":
        # Queries leave a LayerNorm (entries ~1), so an Adam step on the projection moves each entry of A by
        # ~hidden_dim·lr (every input coordinate pushes the same way); 1/hidden_dim brings that to ~lr, a LoRA A's.
        return cls(to_A=nearest_power_of_two(options.a_lr_ratio / hidden_dim),
                   W_l=nearest_power_of_two(options.w_l_lr_ratio))

    def multiplier(self, state_key: str) -> float | None:
        """The multiplier of a method state-dict key (relative to the method), None for other tensors."""
        if state_key.startswith("to_A."):
            return self.to_A
        if state_key.startswith("W_l."):
            return self.W_l
        return None


@register_method
class VipeMethod(VideoMethod):
    """ViPE: perceptual queries → per-layer, per-role low-rank deltas (zero visual tokens at question time)."""

    name = "vipe"
    kind = "weights"
    Options = VipeOptions
    identity_at_birth = True  # W_l starts at zero

    def __init__(self, config, llm: LLMInfo) -> None:
        super().__init__(config, llm)
        if not llm.sites:
            raise ValueError("vipe: no target modules selected (check targets and inject_every/inject_layers)")
        dv_in = self.vision_width
        opt = self.options
        dim, rank = opt.resolved_hidden_dim(llm.hidden_size), config.rank
        self.hidden_dim = dim
        self.scaling = GeneratorScaling.from_options(opt, dim)
        self.input_proj = nn.Sequential(nn.Linear(dv_in, dim), nn.LayerNorm(dim))
        self.frame_embedding = nn.Embedding(config.num_frames, dim)
        nn.init.normal_(self.frame_embedding.weight, std=0.02)
        self.queries = nn.Parameter(torch.randn(rank, dim) * opt.query_init_std)
        self.blocks = nn.ModuleList(QueryBlock(dim, opt.num_heads, opt.ffn_mult, opt.dropout) for _ in range(opt.depth))
        self.final_norm = nn.LayerNorm(dim)
        # Perceptual weight generators: one projection Dv → d_in per site (W_v), one zero W_l (r × d_out) per site.
        # Both hold P; the effective matrices are self.scaling · P (see GeneratorScaling).
        self.to_A = nn.ModuleDict()
        self.W_l = nn.ParameterDict()
        for site, key in zip(llm.sites, llm.site_keys):
            name = _param_name(key)
            self.to_A[name] = nn.Linear(dim, site.in_features, bias=False)
            # Queries leave a LayerNorm (entries ~1): an effective std of 1/sqrt(dim·d_in) gives A rows of norm ~1,
            # so x·Aᵀ is of order 1, like a LoRA A at init.
            std = 1.0 / math.sqrt(dim * site.in_features) / self.scaling.to_A
            nn.init.normal_(self.to_A[name].weight, std=std)
            self.W_l[name] = nn.Parameter(torch.zeros(rank, site.out_features))
        self._keys = list(llm.site_keys)
        self.register_state_dict_post_hook(_save_effective_generators)
        self.register_load_state_dict_pre_hook(_load_effective_generators)

    def video_tokens(self, features: torch.Tensor, frame_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Project features and add positions: (B, T·P, dim) and the token mask (B, T·P)."""
        b, t, p, _ = features.shape
        x = project_frames(features, self.input_proj, self.frame_embedding)
        return x.reshape(b, t * p, -1), token_mask_from_frames(frame_mask, b, t, p, x.device)

    def perceptual_queries(self, features: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The Visual Injection Module: (B, T, P, Dv_in) → queries (B, r, dim)."""
        tokens, mask = self.video_tokens(features, frame_mask)
        q = self.queries[None].expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        for block, keep in zip(self.blocks, self.options.keep_ratios):
            if self.options.merge and keep < 1.0:
                tokens, mask, _ = hierarchical_merge(q, tokens, mask, keep)
            q = block(q, tokens, mask)
        return self.final_norm(q)

    def encode(self, features: torch.Tensor, frame_mask: torch.Tensor | None = None,
               cond: Conditioning | None = None) -> WeightContext:
        q = self.perceptual_queries(features, frame_mask)
        scale = self.config.scale
        # (m·P) q = P (m·q): scaling the (B, r, dim) queries once is cheaper than every (d_in × dim) weight.
        q = q * self.scaling.to_A
        deltas = {}
        for key in self._keys:
            name = _param_name(key)
            A = self.to_A[name](q)  # (B, r, d_in) = W_vᵀ per video
            B = (self.W_l[name] * self.scaling.W_l).t()[None]  # (1, d_out, r) = W_lᵀ, shared
            deltas[key] = LowRank(A, B, scale)
        return WeightContext(deltas)

    def effective_generators(self) -> dict[str, torch.Tensor]:
        """{state key: effective matrix} of the W_v projections and W_l (what a saved adapter holds)."""
        state = {f"to_A.{name}.weight": m.weight for name, m in self.to_A.items()}
        state.update({f"W_l.{name}": p for name, p in self.W_l.items()})
        return {k: v.detach() * self.scaling.multiplier(k) for k, v in state.items()}


def _save_effective_generators(module: VipeMethod, state_dict, prefix: str, local_metadata) -> None:
    # State dicts hold the effective matrices, so saved adapters do not depend on the training multipliers.
    for key in list(state_dict):
        if key.startswith(prefix):
            multiplier = module.scaling.multiplier(key[len(prefix):])
            if multiplier is not None and multiplier != 1.0:
                state_dict[key] = state_dict[key] * multiplier


def _load_effective_generators(module: VipeMethod, state_dict, prefix: str, local_metadata, strict, missing_keys,
                               unexpected_keys, error_msgs) -> None:
    for key in list(state_dict):
        if key.startswith(prefix):
            multiplier = module.scaling.multiplier(key[len(prefix):])
            if multiplier is not None and multiplier != 1.0 and isinstance(state_dict[key], torch.Tensor):
                state_dict[key] = state_dict[key] / multiplier


def _param_name(key: str) -> str:
    # ModuleDict keys may not contain '.'; site keys are module paths.
    return key.replace(".", "__").replace("#", "--")
