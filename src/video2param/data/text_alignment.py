"""A small dual encoder aligned to the demo's vision front end, so that PPLLaVA's relevance map means something.

PPLLaVA weights every patch token by its similarity to the question, read by a CLIP-style text tower. A text tower
with random weights gives a random relevance map; the demo's front end (:mod:`.front_end`) is hand-made, so no
pretrained text tower matches it. This module builds one and aligns it on the MovingShapes training split:

* the model is a tiny ``CLIPModel``: its text transformer reads the word tokenizer's ids; its patch side is CLIP's
  post-layernorm + visual projection applied to the front end's (standardised) features — exactly how
  :meth:`~video2param.video.dual_encoder.DualEncoder.derive_views` makes the projected view at run time (the
  tiny CLIP vision transformer is never run: the features come from the front end);
* contrastive over tokens: for each (video, question) pair, S = softmax over the video's T·P tokens of
  scale · cos(text, patch) should spread its mass evenly over the tokens of the object the question names (every
  object for questions that name none): loss = −mean over the targets of log S. The named object is read off the
  question and the answer (a colour names it; the objects of one video have distinct colours) and found in the
  front end's raw features by its colour (channel 0 = presence, 1:4 = mean RGB).

:func:`load_or_align` caches the aligned model in a directory keyed by its settings and data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .collate import format_prompt
from .front_end import COLOUR, PRESENCE
from .moving_shapes import PALETTE, SHAPES

__all__ = ["AlignerSettings", "align_text_tower", "build_aligner", "load_or_align", "question_text",
           "relevance_quality", "target_tokens"]


@dataclasses.dataclass(frozen=True)
class AlignerSettings:
    """Sizes and training of the aligned dual encoder."""

    width: int = dataclasses.field(default=64, metadata={"help": "Text tower width."})
    layers: int = dataclasses.field(default=2, metadata={"help": "Text tower layers."})
    heads: int = dataclasses.field(default=4, metadata={"help": "Text tower attention heads."})
    embed: int = dataclasses.field(default=32, metadata={"help": "Width of the joint space."})
    positions: int = dataclasses.field(default=32, metadata={"help": "Text positions (questions are ~12 tokens)."})
    steps: int = dataclasses.field(default=400, metadata={"help": "AdamW steps."})
    batch: int = dataclasses.field(default=64, metadata={"help": "(video, question) pairs per step."})
    lr: float = dataclasses.field(default=3e-3, metadata={"help": "Learning rate."})
    seed: int = dataclasses.field(default=0, metadata={"help": "Seed of the initialisation and the batches."})
    even_targets: bool = dataclasses.field(
        default=True,
        metadata={"help": "Loss −mean log S over the target tokens: every token of the named object(s) equally "
                          "relevant, as a similarity-based tower scores equally matching patches alike. False: "
                          "−log Σ S over them, which leaves S free to sit on a few of them (a count question's S "
                          "could then skip whole objects)."})

    def key(self, **data: Any) -> str:
        """Cache key: these settings and what the data depends on."""
        text = json.dumps({**dataclasses.asdict(self), **data}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def question_text(tokenizer: Any, question: str) -> str:
    """What the text tower reads at run time: the decoded question of the demo's prompt (VideoModel's prompt text)."""
    ids = tokenizer(format_prompt(question, None))["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def target_tokens(raw: torch.Tensor, question: str, answer: str, qtype: str,
                  colors: Sequence[str]) -> torch.Tensor:
    """(T, P) bool: the tokens of the object the question names, or of every object when it names none.

    ``raw``: the front end's unstandardised features (T, P, Dv).
    """
    present = raw[..., PRESENCE] > 0.5
    words = question.replace("?", " ").split()
    named = [c for c in colors if c in words]
    if not named and qtype == "color" and any(w in words for w in SHAPES):
        named = [answer]  # "what colour is the square?" names the square, whose colour is the answer
    if not named:
        return present
    rgb = torch.tensor(PALETTE[named[0]], dtype=torch.float32) / 255
    hit = present & ((raw[..., COLOUR] - rgb).abs().amax(-1) < 0.08)
    return hit if bool(hit.any()) else present


def build_aligner(tokenizer: Any, feature_width: int, settings: AlignerSettings | None = None):
    """A random tiny ``CLIPModel`` whose text tower reads ``tokenizer``'s ids and whose vision width is
    ``feature_width`` (its post-layernorm and visual projection act on the front end's features)."""
    from transformers import CLIPConfig, CLIPModel

    settings = settings or AlignerSettings()
    torch.manual_seed(settings.seed)
    heads = next(h for h in (5, 4, 3, 2, 1) if feature_width % h == 0)
    text = dict(vocab_size=len(tokenizer), hidden_size=settings.width, intermediate_size=2 * settings.width,
                num_hidden_layers=settings.layers, num_attention_heads=settings.heads,
                max_position_embeddings=settings.positions, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=feature_width, intermediate_size=2 * feature_width,
                  num_hidden_layers=1, num_attention_heads=heads)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=settings.embed)).eval()


def align_text_tower(model, tokenizer: Any, items: Sequence, raw_items: Sequence, colors: Sequence[str],
                     settings: AlignerSettings | None = None, log: Callable[[str], None] = print):
    """Train ``model``'s text tower, text projection, post-layernorm and visual projection contrastively (module
    docstring). ``items`` carry the (standardised) features the model will see, ``raw_items`` the same videos'
    raw features (for the targets). Returns the model, frozen, with its learned logit scale."""
    from ..video.dual_encoder import DualEncoder

    settings = settings or AlignerSettings()
    dual = DualEncoder(model, text_tokenizer=tokenizer)
    trainable = [*dual.text_model.parameters(), *dual.text_projection.parameters(),
                 *dual.tower.post_layernorm.parameters(), *dual.visual_projection.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    opt = torch.optim.AdamW([*trainable, log_scale], lr=settings.lr, weight_decay=0.01)
    texts = [question_text(tokenizer, it.question) for it in items]
    targets = [target_tokens(r.video, it.question, it.answer, it.qtype, colors) for r, it in zip(raw_items, items)]
    g = torch.Generator().manual_seed(settings.seed)
    for step in range(settings.steps):
        idx = torch.randint(len(items), (settings.batch,), generator=g).tolist()
        feats = torch.stack([items[i].video for i in idx])  # (B, T, P, Dv)
        mask = torch.stack([targets[i] for i in idx]).flatten(1)  # (B, T·P)
        text = dual.encode_text([texts[i] for i in idx])
        patches = F.normalize(dual.project_patches(feats).float(), dim=-1).flatten(1, 2)
        logits = log_scale.exp().clamp(max=100) * torch.einsum("be,bne->bn", text, patches)
        log_s = logits.log_softmax(-1)
        if settings.even_targets:  # cross-entropy against the uniform distribution over the targets
            loss = -((log_s * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
        else:
            loss = -log_s.masked_fill(~mask, float("-inf")).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == settings.steps - 1:
            log(f"  aligner step {step}: loss {loss.item():.3f}, scale {log_scale.exp().item():.1f}")
    with torch.no_grad():
        model.logit_scale.fill_(float(log_scale.clamp(max=math.log(100))))
    return model.requires_grad_(False).eval()


@torch.no_grad()
def relevance_quality(dual, tokenizer: Any, items: Sequence, raw_items: Sequence,
                      colors: Sequence[str]) -> dict[str, float]:
    """On ``items``: mean S mass on the named object's tokens, how often argmax S lands on them, the mass a
    uniform S would give them, and how evenly S spreads over them (``target_spread``: the perplexity of S within
    the targets over their number; 1 = all alike, 1/n = one token holds it all)."""
    mass, top, uniform, spread = [], [], [], []
    for start in range(0, len(items), 100):
        chunk = items[start : start + 100]
        text = dual.encode_text([question_text(tokenizer, it.question) for it in chunk])
        views = dual.derive_views(torch.stack([it.video for it in chunk]), ["projected"])["projected"].flatten(1, 2)
        s = (dual.logit_scale * torch.einsum("be,bne->bn", text, views.float())).softmax(-1)
        for k, it in enumerate(chunk):
            target = target_tokens(raw_items[start + k].video, it.question, it.answer, it.qtype, colors).flatten()
            on_target = s[k][target]
            mass.append(float(on_target.sum()))
            top.append(float(target[s[k].argmax()]))
            uniform.append(float(target.float().mean()))
            within = on_target / on_target.sum().clamp(min=1e-30)
            entropy = -(within * within.clamp(min=1e-30).log()).sum()
            spread.append(float(entropy.exp()) / max(int(target.sum()), 1))
    n = len(mass)
    return {"target_mass": sum(mass) / n, "argmax_on_target": sum(top) / n, "uniform_target_mass": sum(uniform) / n,
            "target_spread": sum(spread) / n}


def load_or_align(directory: str | Path, tokenizer: Any, train: tuple[Sequence, Sequence],
                  held_out: tuple[Sequence, Sequence], colors: Sequence[str], settings: AlignerSettings | None = None,
                  log: Callable[[str], None] = print, **key: Any):
    """The aligned ``DualEncoder`` (cached under ``directory/<key>``) and its relevance quality on ``held_out``.

    ``train`` / ``held_out``: (items with the features the model will see, the same items with raw features).
    ``key``: whatever else the data depends on (frames, split sizes, seed), for the cache key.
    """
    from transformers import CLIPModel

    from ..video.dual_encoder import DualEncoder

    settings = settings or AlignerSettings()
    width = int(train[0][0].video.shape[-1])
    path = Path(directory) / settings.key(feature_width=width, **key)
    if (path / "config.json").is_file() and (path / "quality.json").is_file():
        log(f"aligned dual encoder: cached in {path}")
        model = CLIPModel.from_pretrained(path).eval()
        quality = json.loads((path / "quality.json").read_text())
    else:
        log("aligning a small dual encoder to the vision front end (training split only) ...")
        t0 = time.perf_counter()
        model = align_text_tower(build_aligner(tokenizer, width, settings), tokenizer, *train, colors, settings, log)
        quality = relevance_quality(DualEncoder(model, text_tokenizer=tokenizer), tokenizer, *held_out, colors)
        quality["seconds"] = time.perf_counter() - t0
        model.save_pretrained(path)
        (path / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
    return DualEncoder(model, text_tokenizer=tokenizer), quality
