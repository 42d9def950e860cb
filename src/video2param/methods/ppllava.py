"""PPLLaVA: prompt-guided 3D pooling of the frame tokens (papers/ppllava.md §3.2).

1. Relevance: the question's text embedding c (a CLIP/SigLIP text tower, L2-normalised) against every patch token's
   projected view f(v) (post-layernorm + visual projection, L2-normalised):
   S = softmax over all T·H·W tokens of logit_scale · cos(c, f(v)).
2. Prompt-guided pooling: a 3D "convolution" whose kernel at each window is taken from S
   (``kernels.weighted_pool3d``): kernel = stride = (2, 3, 3) for videos, (1, 3, 3) for images, or windows derived
   from a target output size (overlapping when it does not divide the input).
   ``pool_mode="sum"``: the paper's V' = Σ_window S·V, with S scaled by N / |window| (a constant per video) so that
   uniform relevance gives the window mean; ``"window_softmax"``: the public code's re-normalisation of S inside
   each window with a temperature softmax (0.01).
3. A learned per-output-frame embedding, then a 2-layer MLP projector into the LLM; the pooled tokens are spliced
   at ``<video>``: T'·H'·W' tokens (18× fewer than llava at 32 frames of 24×24 patches with the defaults).
   ``extra_output_sizes`` pools the same S to more sizes (the paper's combination of sizes), each with its own
   per-step embedding, and appends their tokens.
4. CLIP context extension: the text tower's position table is stretched asymmetrically (positions < 20 kept,
   the rest interpolated 4× finer: 77 → 248), plus a zero-initialised trainable residual on the interpolated
   positions. The residual is this adapter's parameter; the text tower runs frozen but with autograd on, so the
   residual receives gradients (the public code's no_grad kept it at zero).

The text tower reads the current turn of the question only — the same text in training and in ``generate`` (the
public code fed it the whole templated conversation in training and the question at inference).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..kernels import weighted_pool3d
from .base import Conditioning, LLMInfo, TokenContext, VideoMethod, register_method

PROJECTED = "projected"  # the vision view this method reads (video.dual_encoder.PROJECTED)


@dataclass
class PPLLaVAOptions:
    kernel: list[int] = field(
        default_factory=lambda: [2, 3, 3],
        metadata={"help": "Pooling window (t, h, w) for videos (paper: 2, 3, 3).", "min": 1, "max": 1024},
    )
    stride: list[int] | None = field(
        default=None, metadata={"help": "Window step (t, h, w) for videos; None = kernel.", "min": 1, "max": 1024}
    )
    image_kernel: list[int] = field(
        default_factory=lambda: [1, 3, 3],
        metadata={"help": "Pooling window (t, h, w) for images (one frame; paper: 1, 3, 3).", "min": 1, "max": 1024},
    )
    image_stride: list[int] | None = field(
        default=None, metadata={"help": "Window step for images; None = image_kernel.", "min": 1, "max": 1024}
    )
    output_size: list[int] | None = field(
        default=None,
        metadata={"help": "Target (T', H', W') instead of kernel/stride: per axis of n positions, stride = n // out "
                          "and kernel = n - (out - 1)·stride, so windows overlap by n mod out (an axis shorter "
                          "than out keeps its n positions).", "min": 1, "max": 1024},
    )
    extra_output_sizes: list[list[int]] = field(
        default_factory=list,
        metadata={"help": "More target sizes (T', H', W'), each pooled from the same S and appended after the main "
                          "tokens with its own temporal embedding: the paper's combination of pooling sizes (Table "
                          "5), e.g. one size that keeps the grid and one that keeps time.", "min": 1, "max": 1024},
    )
    pool_mode: Literal["sum", "window_softmax"] = field(
        default="sum",
        metadata={"help": "sum: Σ S·V over each window (the paper; S scaled by N/|window|); window_softmax: weights "
                          "softmax(S / temperature) inside each window (the public code)."},
    )
    temperature: float = field(
        default=0.01, metadata={"help": "Temperature of window_softmax (public code: 0.01).", "gt": 0.0, "max": 1e3}
    )
    relevance: Literal["prompt", "uniform"] = field(
        default="prompt",
        metadata={"help": "prompt: S from the question (PPLLaVA); uniform: S = 1/N everywhere — unguided pooling "
                          "with the same windows (the ablation)."},
    )
    temporal_embedding: bool = field(
        default=True, metadata={"help": "Add a learned embedding per pooled time step before the projector."}
    )
    extend_text_context: bool = field(
        default=True, metadata={"help": "Stretch the text tower's positions (keep the first text_keep_positions, "
                                        "interpolate the rest text_position_stretch× finer) with a trainable residual."}
    )
    text_keep_positions: int = field(
        default=20, metadata={"help": "Positions kept as they are (interpolation ratio 1; paper: 20).", "min": 0,
                              "max": 4096}
    )
    text_position_stretch: int = field(
        default=4, metadata={"help": "1/r for the positions after the kept ones (paper: r = 0.25).", "min": 1,
                             "max": 64}
    )
    text_hidden_size: int | None = field(
        default=None, metadata={"help": "Width of the text tower's positions; filled from the text tower.", "min": 1,
                                "max": 65536}
    )
    text_positions: int | None = field(
        default=None, metadata={"help": "Positions of the text tower (CLIP 77, SigLIP 64); filled from the text "
                                        "tower.", "min": 1, "max": 65536}
    )

    def __post_init__(self) -> None:
        for name in ("kernel", "stride", "image_kernel", "image_stride", "output_size"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise ValueError(f"options.{name}: expected 3 sizes (t, h, w), got {value!r}")
        for i, size in enumerate(self.extra_output_sizes):
            if len(size) != 3:
                raise ValueError(f"options.extra_output_sizes[{i}]: expected 3 sizes (t, h, w), got {size!r}")
        if self.image_kernel[0] != 1 or (self.image_stride is not None and self.image_stride[0] != 1):
            raise ValueError(f"options.image_kernel: an image has one frame, so its t size must be 1, got "
                             f"{self.image_kernel!r}")


def extend_positions(table: torch.Tensor, keep: int, stretch: int) -> torch.Tensor:
    """Asymmetric interpolation of a position table (L, D) → (keep + stretch·(L − keep), D).

    Position i < keep is row i; position i ≥ keep reads row j = keep + (i − keep) / stretch, linearly interpolated
    between rows ⌊j⌋ and ⌊j⌋ + 1 (papers/ppllava.md eq. 4 with r = 1 then r = 1/stretch); the last stretch − 1
    positions, past row L − 1, repeat it.
    """
    length = table.shape[0]
    keep = min(keep, length)
    new_length = keep + stretch * (length - keep)
    i = torch.arange(new_length, device=table.device, dtype=torch.float64)
    j = torch.where(i < keep, i, keep + (i - keep) / stretch).clamp(max=length - 1)
    low = j.floor().long()
    high = (low + 1).clamp(max=length - 1)
    frac = (j - low.to(j.dtype)).to(table.dtype)[:, None]
    return table[low] * (1 - frac) + table[high] * frac


def window_geometry(size: int, kernel: int, stride: int, output: int | None) -> tuple[int, int]:
    """(kernel, stride) along one axis of ``size`` positions: from a target ``output`` size, else clamped to fit."""
    if output is not None:
        out = min(output, size)
        step = size // out
        return size - (out - 1) * step, step
    return min(kernel, size), min(stride, size)


@register_method
class PPLLaVAMethod(VideoMethod):
    """Prompt-guided pooling: T'·H'·W' projected tokens per video, weighted by their relevance to the question."""

    name = "ppllava"
    kind = "tokens"
    Options = PPLLaVAOptions
    needs = frozenset({"prompt", "prompt_text", "text_encoder"})
    vision_views = (PROJECTED,)

    def __init__(self, config, llm: LLMInfo) -> None:
        super().__init__(config, llm)
        opts = self.options
        dv, d = self.vision_width, llm.hidden_size
        self.temporal = nn.Embedding(config.num_frames, dv) if opts.temporal_embedding else None
        # One table per extra pooling size: its k-th time step is another stretch of the video than the main one's.
        self.extra_temporal = nn.ModuleList(
            nn.Embedding(config.num_frames, dv) for _ in opts.extra_output_sizes if opts.temporal_embedding
        )
        for table in [self.temporal, *self.extra_temporal]:
            if table is not None:
                nn.init.normal_(table.weight, std=0.02)
        self.projector = nn.Sequential(nn.Linear(dv, d), nn.GELU(), nn.Linear(d, d))
        self.text_position_residual: nn.Parameter | None = None
        if opts.relevance == "prompt" and opts.extend_text_context:
            if opts.text_hidden_size is None or opts.text_positions is None:
                raise ValueError(
                    "ppllava: the text tower's width and positions are unknown; wrap the model with a dual encoder "
                    "(vision=CLIPModel/SiglipModel/DualEncoder, or text_encoder=DualEncoder) or set "
                    "options.text_hidden_size and options.text_positions"
                )
            keep = min(opts.text_keep_positions, opts.text_positions)
            extra = opts.text_position_stretch * (opts.text_positions - keep)
            # Zero at birth: the extension starts as the plain interpolation, then learns.
            self.text_position_residual = nn.Parameter(torch.zeros(extra, opts.text_hidden_size))

    @classmethod
    def requirements(cls, options: dict[str, Any]) -> tuple[frozenset[str], tuple[str, ...]]:
        # Uniform relevance is unguided pooling: no question, no text tower, no projected patches.
        if options.get("relevance", "prompt") == "uniform":
            return frozenset(), ()
        return cls.needs, cls.vision_views

    @classmethod
    def complete_config(cls, config, *, vision: Any = None, text_encoder: Any = None):
        """Fill ``text_hidden_size`` / ``text_positions`` from the text tower (ValueError when they disagree)."""
        tower = text_encoder if text_encoder is not None else vision
        if tower is None or not hasattr(tower, "encode_text"):
            return config
        found = {"text_hidden_size": int(tower.text_hidden_size), "text_positions": int(tower.text_max_positions)}
        options = dict(config.options)
        for key, value in found.items():
            if options.get(key) is None:
                options[key] = value
            elif options[key] != value:
                raise ValueError(
                    f"options.{key}: the adapter was built for {options[key]} but the text tower has {value}; "
                    "use the dual encoder the adapter was trained with"
                )
        if options == config.options:
            return config
        return dataclasses.replace(config, options=options)

    # ---- encoding --------------------------------------------------------------------------------------------
    def encode(self, features: torch.Tensor, frame_mask: torch.Tensor | None = None,
               cond: Conditioning | None = None) -> TokenContext:
        features, frame_mask, scores = self._inputs_and_relevance(features, frame_mask, cond)
        b, t, p, dv = features.shape
        side = math.isqrt(p)
        lengths = [t] * b if frame_mask is None else frame_mask.sum(dim=1).tolist()
        pooled: list[torch.Tensor | None] = [None] * b
        # Videos of one real length are pooled together; each is pooled as if it were alone (batch invariance).
        for length in sorted(set(lengths)):
            rows = [i for i, n in enumerate(lengths) if n == length]
            v = _real_frames(features, frame_mask, rows, length).reshape(len(rows), length, side, side, dv)
            s = _real_frames(scores, frame_mask, rows, length).reshape(len(rows), length, side, side)
            for row, out in zip(rows, self._tokens(v, s)):
                pooled[row] = out
        return _pad_tokens([x for x in pooled if x is not None])

    def relevance(self, features: torch.Tensor, frame_mask: torch.Tensor | None = None,
                  cond: Conditioning | None = None) -> torch.Tensor:
        """S (B, T, P): each video's softmax over its real T·P tokens of logit_scale · cos(question, patch);
        0 on padding frames. Uniform (1 / real tokens) with ``relevance="uniform"``."""
        return self._inputs_and_relevance(features, frame_mask, cond)[2]

    def _inputs_and_relevance(self, features, frame_mask, cond):
        cond = cond if cond is not None else Conditioning()
        b, t, p, _ = features.shape
        if t > self.config.num_frames and self.temporal is not None:
            raise ValueError(
                f"videos: {t} frames but the adapter was built for at most num_frames={self.config.num_frames}"
            )
        side = math.isqrt(p)
        if side * side != p:
            raise ValueError(f"videos: ppllava pools a square patch grid, got {p} patches per frame")
        if self.options.relevance == "uniform":
            logits = features.new_zeros((b, t, p), dtype=torch.float32)
        else:
            view = cond.vision_views.get(PROJECTED)
            if view is None:
                raise ValueError(
                    f"ppllava: the vision view {PROJECTED!r} is missing; wrap the model with a dual encoder "
                    "(vision=CLIPModel/SiglipModel/DualEncoder) or pass videos=VideoFeatures(features, "
                    f"views={{{PROJECTED!r}: ...}})"
                )
            text = self.question_embeddings(cond)  # (n, E)
            if b == 1 and text.shape[0] > 1:  # one video asked several questions
                n = text.shape[0]
                features, view = _repeat(features, n), _repeat(view, n)
                frame_mask = None if frame_mask is None else _repeat(frame_mask, n)
                b = n
            if text.shape[0] != b:
                raise ValueError(f"videos: {b} video(s) for {text.shape[0]} question(s)")
            if tuple(view.shape[:3]) != (b, t, p) or view.shape[-1] != text.shape[-1]:
                raise ValueError(
                    f"vision view {PROJECTED!r}: expected shape ({b}, {t}, {p}, {text.shape[-1]}), got "
                    f"{tuple(view.shape)}"
                )
            logit_scale = float(getattr(cond.text_encoder, "logit_scale", 1.0))
            logits = logit_scale * torch.einsum("be,btpe->btp", text.float(), view.float())
        if frame_mask is not None:
            logits = logits.masked_fill(~frame_mask.bool()[:, :, None], float("-inf"))
        scores = torch.softmax(logits.reshape(b, -1), dim=-1).reshape(b, t, p)
        return features, frame_mask, scores

    def question_embeddings(self, cond: Conditioning) -> torch.Tensor:
        """(B, E) normalised embeddings of each sample's question (current turn) from the text tower."""
        tower = cond.text_encoder
        if tower is None or not hasattr(tower, "encode_text"):
            raise ValueError(
                "ppllava: needs a dual encoder's text tower (vision=CLIPModel/SiglipModel/DualEncoder or "
                f"text_encoder=DualEncoder(...)), got {type(tower).__name__}"
            )
        if cond.prompt is None or cond.prompt.texts is None:
            raise ValueError("ppllava: conditions on the question's text; pass input_ids (and a tokenizer)")
        return tower.encode_text(cond.prompt.texts, positions=self.text_positions(tower))

    def text_positions(self, tower: Any) -> torch.Tensor | None:
        """The extended position table (tower's table interpolated + trainable residual), or None (no extension)."""
        if self.text_position_residual is None:
            return None
        opts = self.options
        table = tower.position_table()
        if tuple(table.shape) != (opts.text_positions, opts.text_hidden_size):
            raise ValueError(
                f"ppllava: the adapter was built for a text tower with a ({opts.text_positions}, "
                f"{opts.text_hidden_size}) position table, this one has {tuple(table.shape)}"
            )
        keep = min(opts.text_keep_positions, opts.text_positions)
        extended = extend_positions(table.detach().float(), keep, opts.text_position_stretch)
        residual = self.text_position_residual.float()
        return torch.cat([extended[:keep], extended[keep:] + residual], dim=0)

    def _tokens(self, v: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """(n, T, H, W, Dv) features and relevance (n, T, H, W) → (n, Σ T'·H'·W', D) tokens: the main size's
        tokens, then each extra size's."""
        opts = self.options
        image = v.shape[1] == 1
        kernel = opts.image_kernel if image else opts.kernel
        stride = (opts.image_stride if image else opts.stride) or kernel
        sizes = [opts.output_size, *opts.extra_output_sizes]
        tables = [self.temporal, *self.extra_temporal] if self.temporal is not None else [None] * len(sizes)
        parts = []
        for size, table in zip(sizes, tables):
            out = prompt_guided_pool(v, scores, kernel, stride, size, opts.pool_mode, opts.temperature)
            if table is not None:
                out = out + table.weight[: out.shape[1]].to(out.dtype)[None, :, None, None, :]
            parts.append(out.reshape(out.shape[0], -1, out.shape[-1]))
        return self.projector(torch.cat(parts, dim=1).to(self.projector[0].weight.dtype))


def prompt_guided_pool(v: torch.Tensor, scores: torch.Tensor, kernel, stride, output_size=None,
                       mode: str = "sum", temperature: float = 0.01) -> torch.Tensor:
    """Pool (n, T, H, W, C) features by their relevance S (n, T, H, W) (each video's S sums to 1).

    Windows per axis come from ``window_geometry`` (``output_size`` wins over kernel/stride). ``"sum"``: Σ S·V over
    each window with S scaled by N / |window| (N = T·H·W), so uniform relevance gives each window's mean;
    ``"window_softmax"``: weights softmax(S / temperature) inside each window. Returns (n, T', H', W', C).
    """
    sizes = tuple(v.shape[1:4])
    output = output_size or (None, None, None)
    geometry = [window_geometry(n, k, s, o) for n, k, s, o in zip(sizes, kernel, stride, output)]
    kernel = tuple(g[0] for g in geometry)
    stride = tuple(g[1] for g in geometry)
    if mode == "sum":
        scores = scores * (math.prod(sizes) / math.prod(kernel))
    return weighted_pool3d(v, scores, kernel, stride, mode=mode, temperature=temperature)


def _repeat(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.expand(n, *x.shape[1:])


def _real_frames(x: torch.Tensor, frame_mask: torch.Tensor | None, rows: list[int], length: int) -> torch.Tensor:
    """The real frames (in order) of the given rows, each of which has ``length`` of them: (len(rows), length, ...)."""
    if frame_mask is None:
        return x[rows] if len(rows) != x.shape[0] else x
    picked = [x[i][frame_mask[i].bool()] for i in rows]
    return torch.stack(picked)[:, :length]


def _pad_tokens(tokens: list[torch.Tensor]) -> TokenContext:
    """Per-video token sequences (N_i, D) → a TokenContext padded to the longest, with its mask."""
    longest = max(x.shape[0] for x in tokens)
    if all(x.shape[0] == longest for x in tokens):
        return TokenContext(torch.stack(tokens), None)
    embeds = tokens[0].new_zeros((len(tokens), longest, tokens[0].shape[-1]))
    mask = torch.zeros((len(tokens), longest), dtype=torch.bool, device=embeds.device)
    for i, x in enumerate(tokens):
        embeds[i, : x.shape[0]] = x
        mask[i, : x.shape[0]] = True
    return TokenContext(embeds, mask)
