"""Video2LoRA: a Perceiver hypernetwork writes a LoRA per video from the frozen LLM's own reading of it.

Teacher read-out: a token adapter (``wrap_model(teacher=...)``, e.g. llava) turns the video into tokens; the frozen
LLM reads them followed by an instruction ("Internalize this video for later captioning.") through the library's
one splice path, every weight delta off. The residual stream entering each target layer, at every position of
that prompt (masked), is the hypernetwork's input; nothing in the LLM changes.

Hypernetwork (papers/video2lora-abstract.md; the public Frames2LoRA / Doc-to-LoRA code, read in DESIGN.md):
layers are folded into the batch and one Perceiver serves all of them. Input projection SwiGLU d → 4d → 512;
8 learned latents; 9 Idefics2-style cross-attention blocks (keys/values = context ++ latents, RMSNorm pre/post,
SwiGLU FFN), no self-attention; a decoder cross-attention with one learned query per (target module of a layer,
rank row) reading the latents; a shared residual MLP; L2-normalised rows; a per-site linear head emitting the A row
and the B row of each rank; per-rank scalers (A's at 1, B's at 0, so a fresh adapter is the identity); a learned
static "bias" LoRA (random A, zero B) appended along the rank axis. The delta scale is 2·r^1.5 as in the public
code (``scale_rule="alpha/r"`` uses the config's alpha / rank instead).

Long videos are cut into segments of ``segment_frames`` (the training length); the teacher reads each segment
alone, a LoRA is generated per segment, and the LoRAs are concatenated along the rank axis with the bias LoRA once:
the delta is the sum of the segment deltas plus the bias delta.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import Conditioning, LLMInfo, LowRank, VideoMethod, WeightContext, register_method
from .blocks import PerceiverAttention, PerceiverBlock, SwiGLU, sinusoid

DEFAULT_INSTRUCTION = "Internalize this video for later captioning."


@dataclass
class Video2LoRAOptions:
    teacher: str | None = field(
        default=None,
        metadata={"help": "Directory or Hub repo id of the token adapter that reads the video (the teacher). Filled "
                          "in by wrap_model(teacher=DIR) so from_pretrained loads it again; None when the teacher "
                          "was given as a VideoModel (pass it to from_pretrained then)."},
    )
    instruction: str = field(
        default=DEFAULT_INSTRUCTION,
        metadata={"help": "Text the LLM reads after the video in the read-out (tokenized with the model's "
                          "tokenizer; the public code's instruction by default)."},
    )
    chat_template: bool = field(
        default=False,
        metadata={"help": "Wrap the read-out prompt in the tokenizer's chat template as one user turn, no "
                          "assistant header (as the public code does with a chat VLM)."},
    )
    segment_frames: int | None = field(
        default=None,
        metadata={"help": "Frames per segment of a long video (one LoRA each, composed along the rank axis); "
                          "None = num_frames, the training length.", "min": 1, "max": 16384},
    )
    latent_dim: int = field(default=512, metadata={"help": "Width of the Perceiver (public code: 512).",
                                                   "min": 1, "max": 65536})
    num_latents: int = field(default=8, metadata={"help": "Learned latents of the Perceiver encoder.",
                                                  "min": 1, "max": 4096})
    depth: int = field(default=9, metadata={"help": "Perceiver cross-attention blocks (no self-attention).",
                                            "min": 1, "max": 256})
    num_heads: int = field(default=16, metadata={"help": "Query heads of the Perceiver attentions.",
                                                 "min": 1, "max": 1024})
    head_dim: int = field(default=128, metadata={"help": "Width of one attention head.", "min": 1, "max": 4096})
    kv_heads: int = field(default=4, metadata={"help": "Key/value heads (grouped; must divide num_heads).",
                                               "min": 1, "max": 1024})
    ffn_mult: int = field(default=4, metadata={"help": "SwiGLU FFN width of a block, as a multiple of latent_dim.",
                                               "min": 1, "max": 64})
    input_mult: int = field(default=4, metadata={"help": "Hidden width of the input SwiGLU (d → input_mult·d → "
                                                         "latent_dim), as a multiple of the LLM width d.",
                                                 "min": 1, "max": 64})
    head_hidden: int = field(default=2048, metadata={"help": "Hidden width of the shared residual MLP before the "
                                                             "per-site heads.", "min": 1, "max": 262144})
    input_norm: bool = field(
        default=False,
        metadata={"help": "RMS-normalise each hidden state (no weights) before the input projection. Off in the "
                          "public code; useful when the LLM's residual stream grows large with depth."},
    )
    context_positions: bool = field(
        default=True,
        metadata={"help": "Add a learned code of each read-out position (a zero-initialised projection of a fixed "
                          "sinusoid) to the hypernetwork's input. The Perceiver's cross-attention reads a set, and a "
                          "RoPE LLM's residual stream holds no absolute position, so without it frame order reaches "
                          "the LoRA only through the LLM's causal mixing. Off in the public code, and in adapters "
                          "saved before this option existed.", "saved_before": False},
    )
    bias_lora: bool = field(
        default=True,
        metadata={"help": "Append a learned static LoRA (random A, zero B) of rank r to every generated one."},
    )
    scale_rule: Literal["2r^1.5", "alpha/r"] = field(
        default="2r^1.5",
        metadata={"help": "Delta scale: '2r^1.5' (public code: 128 at r = 16, used as is) or 'alpha/r' (the config's "
                          "alpha / rank, like the other weight methods)."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.num_heads, int) and isinstance(self.kv_heads, int) and self.kv_heads \
                and self.num_heads % self.kv_heads:
            raise ValueError(f"options.kv_heads: {self.kv_heads} does not divide num_heads {self.num_heads}")


@dataclass
class Segment:
    """The generated factors of one segment: {site key: (A (B, r, d_in), B (B, d_out, r))}."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]


@register_method
class Video2LoRAMethod(VideoMethod):
    """Video2LoRA: a Perceiver over the LLM's reading of the video → a per-video LoRA (zero visual tokens)."""

    name = "video2lora"
    kind = "weights"
    Options = Video2LoRAOptions
    needs = frozenset({"llm_readout", "tokenizer", "teacher"})
    identity_at_birth = True  # B scalers and the bias LoRA's B start at zero

    def __init__(self, config, llm: LLMInfo) -> None:
        super().__init__(config, llm)
        if not llm.sites:
            raise ValueError("video2lora: no target modules selected (check targets and inject_every/inject_layers)")
        opt = self.options
        rank, dim = config.rank, opt.latent_dim
        self.rank = rank
        self.segment_frames = opt.segment_frames or config.num_frames
        self.delta_scale = float(2.0 * rank ** 1.5) if opt.scale_rule == "2r^1.5" else config.scale
        # Sites grouped by layer: layer l's hidden states generate layer l's LoRAs; slot j = j-th site of its layer.
        self._layers = sorted({site.layer for site in llm.sites})
        layer_index = {layer: i for i, layer in enumerate(self._layers)}
        self._slots: dict[str, tuple[int, int]] = {}
        per_layer: dict[int, int] = {}
        for site, key in zip(llm.sites, llm.site_keys):
            j = per_layer.get(site.layer, 0)
            per_layer[site.layer] = j + 1
            self._slots[key] = (layer_index[site.layer], j)
        self._modules_per_layer = max(per_layer.values())
        self._keys = list(llm.site_keys)
        self._in_features = {key: site.in_features for site, key in zip(llm.sites, llm.site_keys)}

        d = llm.hidden_size
        self.input_norm = nn.RMSNorm(d, elementwise_affine=False) if opt.input_norm else None
        self.input_proj = SwiGLU(d, opt.input_mult * d, dim)
        self.position_proj = nn.Linear(dim, dim, bias=False) if opt.context_positions else None
        if self.position_proj is not None:
            nn.init.zeros_(self.position_proj.weight)  # starts as the public code's hypernetwork; learns positions
        self.latents = nn.Parameter(torch.randn(opt.num_latents, dim))
        self.blocks = nn.ModuleList(
            PerceiverBlock(dim, opt.num_heads, opt.head_dim, opt.kv_heads, opt.ffn_mult) for _ in range(opt.depth)
        )
        self.final_norm = nn.RMSNorm(dim, eps=1e-6)
        # Decoder: one query per (module slot, rank row), shared by the layers (they are folded into the batch).
        self.queries = nn.Parameter(torch.randn(self._modules_per_layer * rank, dim))
        self.norm_queries = nn.RMSNorm(dim, eps=1e-6)
        self.decoder = PerceiverAttention(dim, opt.num_heads, opt.head_dim, opt.kv_heads, attend_to_self=False)
        self.head_norm_in = nn.LayerNorm(dim)
        self.head_mlp = nn.Sequential(nn.Linear(dim, opt.head_hidden), nn.SiLU(), nn.Linear(opt.head_hidden, dim))
        self.head_norm_out = nn.LayerNorm(dim)
        self.heads = nn.ModuleDict()
        self.scale_A = nn.ParameterDict()
        self.scale_B = nn.ParameterDict()
        self.bias_A = nn.ParameterDict()
        self.bias_B = nn.ParameterDict()
        for site, key in zip(llm.sites, llm.site_keys):
            name = _param_name(key)
            self.heads[name] = nn.Linear(dim, site.in_features + site.out_features, bias=False)
            self.scale_A[name] = nn.Parameter(torch.ones(rank))
            self.scale_B[name] = nn.Parameter(torch.zeros(rank))  # zero: a fresh adapter adds nothing
            if opt.bias_lora:
                std = 0.2 / math.sqrt(site.in_features * rank)
                self.bias_A[name] = nn.Parameter(torch.randn(rank, site.in_features) * std)
                self.bias_B[name] = nn.Parameter(torch.zeros(site.out_features, rank))

    # ---- read-out --------------------------------------------------------------------------------------------
    def readout_prompt(self, tokenizer: Any, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The read-out prompt (video mark + instruction) as ids and mask (batch, L), tokenized with ``tokenizer``."""
        mark = self.config.video_token
        text = f"{mark} {self.options.instruction}".rstrip()
        if self.options.chat_template:
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError("options.chat_template: the tokenizer has no chat template")
            encoded = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                    add_generation_prompt=False, return_dict=True)
            ids = list(encoded["input_ids"])
        else:
            ids = list(tokenizer(text)["input_ids"])
        mark_id = tokenizer.convert_tokens_to_ids(mark)
        if ids.count(mark_id) != 1:
            raise ValueError(
                f"options.instruction: the read-out prompt must hold the video mark {mark!r} exactly once as one "
                f"token, got {ids.count(mark_id)} (is {mark!r} a special token of the tokenizer?)"
            )
        ids_t = torch.tensor([ids], dtype=torch.long, device=device).expand(batch, -1)
        return ids_t, torch.ones_like(ids_t)

    def read_segment(self, features: torch.Tensor, frame_mask: torch.Tensor | None,
                     cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher reads one segment: hidden states (B, n_layers, N, D) entering the target layers, mask (B, N)."""
        ids, mask = self.readout_prompt(cond.tokenizer, features.shape[0], features.device)
        tokens = cond.teacher(features, frame_mask, ids, mask)
        readout = cond.read_llm(tokens, ids, mask)
        hidden = torch.stack([readout.hidden_states[layer] for layer in self._layers], dim=1)
        return hidden.to(self.latents.dtype), readout.mask

    # ---- hypernetwork ----------------------------------------------------------------------------------------
    def hypernetwork(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> Segment:
        """Hidden states (B, n_layers, N, D) and their mask (B, N) → generated factors per site."""
        b, n_layers, n, d = hidden.shape
        x = hidden.reshape(b * n_layers, n, d)  # layers folded into the batch
        ctx_mask = None if mask is None else mask[:, None, :].expand(b, n_layers, n).reshape(b * n_layers, n)
        if self.input_norm is not None:
            x = self.input_norm(x)
        x = self.input_proj(x)
        if self.position_proj is not None:
            # Ordinal among the real positions, so padding (a shorter video in the batch) shifts nothing.
            index = torch.arange(n, device=x.device)[None] if ctx_mask is None else ctx_mask.long().cumsum(-1) - 1
            x = x + self.position_proj(sinusoid(index.clamp_min(0), x.shape[-1]).to(x.dtype))
        latents = self.latents[None].expand(b * n_layers, -1, -1)
        for block in self.blocks:
            latents = block(latents, x, ctx_mask)
        latents = self.final_norm(latents)
        queries = self.queries[None].expand(b * n_layers, -1, -1)
        rows = queries + self.decoder(self.norm_queries(queries), latents)
        rows = self.head_norm_out(rows + self.head_mlp(self.head_norm_in(rows)))
        rows = F.normalize(rows, dim=-1).view(b, n_layers, self._modules_per_layer, self.rank, -1)
        factors = {}
        for key in self._keys:
            name = _param_name(key)
            layer, slot = self._slots[key]
            out = self.heads[name](rows[:, layer, slot])  # (B, r, d_in + d_out)
            d_in = self._in_features[key]
            A = out[..., :d_in] * self.scale_A[name][:, None]
            B = (out[..., d_in:] * self.scale_B[name][:, None]).transpose(1, 2)
            factors[key] = (A, B)
        return Segment(factors)

    # ---- encode / compose -----------------------------------------------------------------------------------
    def encode(self, features: torch.Tensor, frame_mask: torch.Tensor | None = None,
               cond: Conditioning | None = None) -> WeightContext:
        if cond is None or cond.read_llm is None or cond.teacher is None or cond.tokenizer is None:
            raise ValueError("video2lora: encode needs the LLM read-out, the tokenizer and the teacher "
                             "(call it through VideoModel, built with tokenizer= and teacher=)")
        segments = self.segment_loras(features, frame_mask, cond)
        if torch.is_grad_enabled():
            return self.compose(list(segments))
        # Inference: write each segment into the composed factors as it comes, so the peak memory is the LoRA
        # itself plus one segment's read-out (a list then a concatenation would hold the LoRA twice).
        return self._compose_streaming(segments, math.ceil(features.shape[1] / self.segment_frames))

    def segment_loras(self, features: torch.Tensor, frame_mask: torch.Tensor | None,
                      cond: Conditioning) -> Iterator[Segment]:
        """One generated LoRA per segment of ``segment_frames`` frames, each segment read by the teacher alone."""
        t = features.shape[1]
        for start in range(0, t, self.segment_frames):
            stop = min(start + self.segment_frames, t)
            seg_mask = None if frame_mask is None else frame_mask[:, start:stop]
            present = None
            if seg_mask is not None:
                present = seg_mask.any(dim=1)
                if not bool(present.any()):
                    continue  # padding of every video in the batch: no segment at all
                if bool(seg_mask.all()):
                    seg_mask = None
                elif not bool(present.all()):
                    # The teacher reads no empty video: give such rows their first (padding) frame; their
                    # segment LoRA is zeroed below, so what it reads there never matters.
                    seg_mask = seg_mask.clone()
                    seg_mask[~present, 0] = True
            with torch.no_grad():
                hidden, mask = self.read_segment(features[:, start:stop], seg_mask, cond)
            segment = self.hypernetwork(hidden, mask)
            if present is not None and not bool(present.all()):
                # A video shorter than its batch-mates has no frame here: its segment adds nothing.
                keep = present.to(hidden.dtype)[:, None, None]
                segment = Segment({k: (A * keep, B) for k, (A, B) in segment.factors.items()})
            yield segment

    def compose(self, segments: list[Segment]) -> WeightContext:
        """Concatenate segment LoRAs along the rank axis, the bias LoRA once: delta = Σ_segments + bias."""
        if not segments:
            raise ValueError("video2lora: no segment to compose")
        deltas = {}
        for key in self._keys:
            name = _param_name(key)
            A_parts = [seg.factors[key][0] for seg in segments]
            B_parts = [seg.factors[key][1] for seg in segments]
            if self.options.bias_lora:
                batch = A_parts[0].shape[0]
                A_parts.append(self.bias_A[name][None].expand(batch, -1, -1).to(A_parts[0].dtype))
                B_parts.append(self.bias_B[name][None].expand(batch, -1, -1).to(B_parts[0].dtype))
            deltas[key] = LowRank(torch.cat(A_parts, dim=1), torch.cat(B_parts, dim=2), self.delta_scale)
        return WeightContext(deltas)

    def _compose_streaming(self, segments: Iterator[Segment], max_segments: int) -> WeightContext:
        """``compose`` for segments that arrive one by one (no autograd): preallocated factors, filled in place."""
        r = self.rank
        buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        used = 0
        for segment in segments:
            for key, (A, B) in segment.factors.items():
                if key not in buffers:
                    width = (max_segments + 1) * r
                    buffers[key] = (A.new_empty(A.shape[0], width, A.shape[2]), B.new_empty(B.shape[0], B.shape[1],
                                                                                            width))
                buffers[key][0][:, used * r:(used + 1) * r] = A
                buffers[key][1][:, :, used * r:(used + 1) * r] = B
            used += 1
        if not used:
            raise ValueError("video2lora: no segment to compose")
        deltas = {}
        for key, (A, B) in buffers.items():
            name = _param_name(key)
            width = used * r
            if self.options.bias_lora:
                A[:, width:width + r] = self.bias_A[name].to(A.dtype)
                B[:, :, width:width + r] = self.bias_B[name].to(B.dtype)
                width += r
            # Contiguous: a copy only when segments of padding were skipped (the buffer is wider than needed).
            deltas[key] = LowRank(A[:, :width].contiguous(), B[:, :, :width].contiguous(), self.delta_scale)
        return WeightContext(deltas)

    def compose_contexts(self, contexts: list[WeightContext]) -> WeightContext:
        """Compose contexts this method made for separate segments (each carrying the bias LoRA) into one."""
        segments = [Segment({k: (d.A, d.B) for k, d in self.split_bias(c)[0].deltas.items()}) for c in contexts]
        return self.compose(segments)

    def split_bias(self, context: WeightContext) -> tuple[WeightContext, WeightContext | None]:
        """(generated part, bias LoRA part) of a context this method made; the bias is its last ``rank`` ranks."""
        if not self.options.bias_lora:
            return context, None
        generated, bias = {}, {}
        r = self.rank
        for key, d in context.deltas.items():
            if d.A.shape[1] <= r:
                raise ValueError(f"video2lora: delta {key!r} has rank {d.A.shape[1]}, no generated part before the "
                                 f"bias LoRA of rank {r}")
            generated[key] = LowRank(d.A[:, :-r], d.B[:, :, :-r], d.scale)
            bias[key] = LowRank(d.A[:, -r:], d.B[:, :, -r:], d.scale)
        return WeightContext(generated), WeightContext(bias)


def _param_name(key: str) -> str:
    # ModuleDict keys may not contain '.'; site keys are module paths.
    return key.replace(".", "__").replace("#", "--")
