"""A CLIP or SigLIP dual encoder: frame features for the LLM, relevance views of them, and the text tower.

PPLLaVA (papers/ppllava.md §3.2) needs three things from one contrastively trained model:

- the vision tower's patch features of one hidden layer (default: the penultimate), which the LLM reads — what
  :class:`~video2param.video.encoder.VisionEncoder` produces, so :class:`DualEncoder` is one;
- the **projected view** of those same features: each patch token through the vision tower's post-layernorm and
  its visual projection (CLIP: ``visual_projection``; SigLIP: its attention-pooling head applied to each patch on
  its own), L2-normalised, so that a patch can be compared with a text embedding;
- the **text tower**: a question's embedding (CLIP: the EOS token's feature through ``text_projection``; SigLIP:
  the last position through its text head), L2-normalised, and the model's logit scale.

The projected view is a function of the features, so it is derived from them (:meth:`DualEncoder.derive_views`)
whenever the features came from this tower; features that were transformed afterwards (standardised, say) must
come with their views precomputed (``videos=VideoFeatures(features, views={"projected": ...})``).

:meth:`DualEncoder.encode_text` takes an optional position table that replaces the text tower's own, which is how
a method extends the text context (PPLLaVA: 77 → 248 positions) with trainable parameters of its own: the text
tower runs with gradients enabled (its weights stay frozen), so those parameters receive gradients.

Everything here is frozen and stays in eval mode; nothing of it enters an adapter's state dict.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import VisionEncoder, _read_processor_config

__all__ = ["DualEncoder", "PROJECTED", "dual_encoder_family", "is_dual_encoder_model"]

#: Name of the view holding the L2-normalised projected patch tokens, shape (..., P, E).
PROJECTED = "projected"

Family = Literal["clip", "siglip"]
_FAMILIES: dict[str, Family] = {"clip": "clip", "siglip": "siglip"}


def dual_encoder_family(model: Any) -> Family | None:
    """``"clip"`` or ``"siglip"`` for a full dual-encoder model (both towers present), None for anything else."""
    config = getattr(model, "config", None)
    family = _FAMILIES.get(getattr(config, "model_type", None) or "")
    if family is None or not isinstance(model, nn.Module):
        return None
    if getattr(model, "text_model", None) is None or getattr(model, "vision_model", None) is None:
        return None
    return family


def is_dual_encoder_model(model: Any) -> bool:
    """True for a ``CLIPModel`` / ``SiglipModel`` (or a model of the same layout): both towers, one config."""
    return dual_encoder_family(model) is not None


class DualEncoder(VisionEncoder):
    """A frozen CLIP/SigLIP model seen as a vision tower with relevance views and a text tower.

    Args:
        model: a ``CLIPModel`` or ``SiglipModel`` (both towers).
        text_tokenizer: the text tower's tokenizer (``CLIPTokenizer``, SigLIP's, or any tokenizer with ``__call__``,
            ``pad_token_id``/``eos_token_id``). None: loaded with ``AutoTokenizer`` from the model's
            ``name_or_path`` the first time a text is encoded.
        **vision_kwargs: passed to :class:`VisionEncoder` (``hidden_layer`` default -2, preprocessing, chunking).

    ``encode_frames`` / ``encode_clips`` / ``encode_video`` give the LLM's features exactly as a
    ``VisionEncoder`` of the same vision tower would.
    """

    VIEWS: tuple[str, ...] = (PROJECTED,)

    def __init__(self, model: nn.Module, *, text_tokenizer: Any = None, **vision_kwargs: Any) -> None:
        family = dual_encoder_family(model)
        if family is None:
            raise ValueError(
                f"DualEncoder: expected a CLIPModel or SiglipModel (both towers), got {type(model).__name__}"
                + (f" (model_type={model.config.model_type!r})" if hasattr(getattr(model, "config", None), "model_type") else "")
            )
        super().__init__(model, **vision_kwargs)
        self.family: Family = family
        self.text_model = model.text_model
        # CLIP projects both towers with separate linears; SigLIP's heads sit inside its towers.
        self.text_projection = getattr(model, "text_projection", None) if family == "clip" else None
        self.visual_projection = getattr(model, "visual_projection", None) if family == "clip" else None
        if family == "clip" and (self.text_projection is None or self.visual_projection is None):
            raise ValueError(f"DualEncoder: {type(model).__name__} has no text_projection/visual_projection")
        if getattr(self.tower, "post_layernorm", None) is None:
            raise ValueError(f"DualEncoder: the vision tower {type(self.tower).__name__} has no post_layernorm")
        if family == "siglip" and getattr(self.tower, "head", None) is None:
            raise ValueError("DualEncoder: this SigLIP vision tower has no attention-pooling head (vision_use_head)")
        # exp(logit_scale) is what multiplies the cosine similarities (CLIP ≈ 100 after training).
        self.logit_scale = float(model.logit_scale.detach().float().exp())
        self.name_or_path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        self._text_tokenizer = text_tokenizer
        self.requires_grad_(False)
        self.eval()

    # -- sizes -----------------------------------------------------------------------------------------

    @property
    def text_hidden_size(self) -> int:
        """Width of the text tower's token embeddings (and of its position table)."""
        return int(self.text_model.embeddings.token_embedding.weight.shape[1])

    @property
    def text_max_positions(self) -> int:
        """Positions the text tower was trained with (CLIP 77, SigLIP 64)."""
        return int(self.text_model.embeddings.position_embedding.weight.shape[0])

    @property
    def embed_dim(self) -> int:
        """Width E of the joint space (projected patches and text embeddings)."""
        probe = torch.zeros(1, 1, self.hidden_size, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            return int(self.project_patches(probe).shape[-1])

    def position_table(self) -> torch.Tensor:
        """The text tower's own (frozen) position embeddings, (text_max_positions, text_hidden_size)."""
        return self.text_model.embeddings.position_embedding.weight

    def train(self, mode: bool = True) -> "DualEncoder":
        super().train(mode)
        nn.Module.train(self, False)  # frozen helper: dropout and norms never switch to training behaviour
        return self

    # -- vision views ----------------------------------------------------------------------------------

    def derive_views(self, features: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The named views of ``features`` (..., Dv) — this tower's own features (layer ``hidden_layer``).

        ``"projected"``: post-layernorm, visual projection, L2 normalisation → (..., E), in the tower's dtype.
        Raises ValueError for a view this encoder cannot derive, or features of another width.
        """
        unknown = [n for n in names if n not in self.VIEWS]
        if unknown:
            raise ValueError(f"vision views {unknown}: {type(self).__name__} provides {list(self.VIEWS)}")
        if features.shape[-1] != self.hidden_size:
            raise ValueError(
                f"videos: features are {features.shape[-1]} wide but this dual encoder's vision tower gives "
                f"{self.hidden_size}; pass its own features or precomputed views (VideoFeatures)"
            )
        with torch.no_grad():
            x = features.to(device=self.device, dtype=self.dtype)
            return {PROJECTED: F.normalize(self.project_patches(x).float(), dim=-1).to(self.dtype)}

    def project_patches(self, features: torch.Tensor) -> torch.Tensor:
        """(..., Dv) patch features → (..., E) in the joint space, not normalised (differentiable; the projected
        view is this, L2-normalised)."""
        x = self.tower.post_layernorm(features)
        if self.family == "clip":
            return self.visual_projection(x)
        return _siglip_head_per_patch(self.tower.head, x)

    # -- text tower ------------------------------------------------------------------------------------

    @property
    def text_tokenizer(self) -> Any:
        """The text tower's tokenizer (loaded from ``name_or_path`` on first use when none was given)."""
        if self._text_tokenizer is None:
            if not self.name_or_path:
                raise ValueError(
                    "DualEncoder: no tokenizer for the text tower; pass DualEncoder(model, text_tokenizer=...)"
                )
            from transformers import AutoTokenizer

            try:
                self._text_tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
            except (OSError, ValueError) as exc:
                raise ValueError(
                    f"DualEncoder: could not load the text tokenizer of {self.name_or_path!r} ({exc}); pass "
                    "DualEncoder(model, text_tokenizer=...)"
                ) from exc
        return self._text_tokenizer

    def tokenize(self, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``texts`` → ids (B, L) and lengths (B,), each sequence ending with the tokenizer's EOS.

        CLIP pads to the longest text (its causal mask keeps padding out of the EOS feature); SigLIP pads to
        ``max_length``, as it was trained. A text longer than ``max_length`` tokens is cut to fit (its EOS kept)
        with a warning that names its length.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"texts: expected a list of strings, got {texts!r}")
        tok = self.text_tokenizer
        eos = getattr(tok, "eos_token_id", None)
        pad = getattr(tok, "pad_token_id", None)
        pad = pad if pad is not None else (eos if eos is not None else 0)
        rows: list[list[int]] = []
        for text in texts:
            ids = list(tok(text, add_special_tokens=True)["input_ids"])
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)  # the pooled feature is read at the EOS token
            if len(ids) > max_length:
                warnings.warn(
                    f"prompt text: a question of {len(ids)} tokens is longer than the text tower's {max_length} "
                    f"positions; it is truncated to {max_length}",
                    UserWarning,
                    stacklevel=3,
                )
                ids = ids[: max_length - 1] + ([eos] if eos is not None else ids[max_length - 1 : max_length])
            rows.append(ids)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        width = max_length if self.family == "siglip" else int(lengths.max())
        out = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out.to(self.device), lengths.to(self.device)

    def encode_text(self, texts: Sequence[str], positions: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised text embeddings (B, E) of ``texts``, differentiable w.r.t. ``positions``.

        ``positions`` (L', text_hidden_size) replaces the tower's position table (a longer one extends the
        context to L' tokens); None uses the tower's own. The tower's weights are frozen, but the pass runs with
        autograd enabled so that a trainable ``positions`` receives gradients.
        """
        table = self.position_table() if positions is None else positions
        if table.dim() != 2 or table.shape[1] != self.text_hidden_size:
            raise ValueError(
                f"positions: expected a ({'L'}, {self.text_hidden_size}) table, got {tuple(table.shape)}"
            )
        ids, lengths = self.tokenize(texts, int(table.shape[0]))
        embeddings = self.text_model.embeddings
        hidden = embeddings.token_embedding(ids) + table[: ids.shape[1]].to(embeddings.token_embedding.weight.dtype)
        rows = torch.arange(ids.shape[0], device=ids.device)
        if self.family == "clip":
            from transformers.masking_utils import create_causal_mask

            padding = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).long()
            mask = create_causal_mask(config=self.text_model.config, inputs_embeds=hidden, attention_mask=padding,
                                      cache=None)
            out = self.text_model.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True)
            last = self.text_model.final_layer_norm(out.last_hidden_state)
            pooled = self.text_projection(last[rows, lengths - 1])  # the EOS token of each text
        else:
            # SigLIP was trained on max_length padding without a mask and reads the last position.
            out = self.text_model.encoder(inputs_embeds=hidden, attention_mask=None)
            last = self.text_model.final_layer_norm(out.last_hidden_state)
            pooled = self.text_model.head(last[:, -1])
        return F.normalize(pooled.float(), dim=-1)

    # -- loading ---------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        text_tokenizer: Any = None,
        **kwargs: Any,
    ) -> "DualEncoder":
        """Load a CLIP or SigLIP checkpoint (both towers), its tokenizer and its image-processor settings.

        ``name_or_path``: a Hub name (``"openai/clip-vit-large-patch14-336"``) or a local directory. Remaining
        keyword arguments go to :class:`VisionEncoder`.
        """
        from transformers import AutoConfig, AutoTokenizer, CLIPModel, SiglipModel

        name = os.fspath(name_or_path)
        config = AutoConfig.from_pretrained(name)
        family = _FAMILIES.get(getattr(config, "model_type", None) or "")
        if family is None:
            raise ValueError(
                f"vision: {name!r} is a {getattr(config, 'model_type', None)!r} model; a dual encoder must be a "
                "CLIP or SigLIP checkpoint with both towers"
            )
        model_cls = CLIPModel if family == "clip" else SiglipModel
        load_kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
        model = model_cls.from_pretrained(name, **load_kwargs)
        if device is not None:
            model.to(device)
        if text_tokenizer is None:
            text_tokenizer = AutoTokenizer.from_pretrained(name)
        if "preprocessing" not in kwargs:
            processor = _read_processor_config(name)
            if processor is not None:
                kwargs["preprocessing"] = processor
        return cls(model, text_tokenizer=text_tokenizer, **kwargs)


def _siglip_head_per_patch(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SigLIP's attention-pooling head applied to every patch on its own: (..., D) → (..., D).

    With one key, the attention weight is 1 whatever the probe, so the head reduces to the value and output
    projections followed by its residual MLP — the head's own computation for a one-patch image.
    """
    attn = head.attention
    d = x.shape[-1]
    w_v = attn.in_proj_weight[2 * d :]
    b_v = attn.in_proj_bias[2 * d :] if attn.in_proj_bias is not None else None
    y = attn.out_proj(F.linear(x, w_v, b_v))
    return y + head.mlp(head.layernorm(y))
