"""Video features for training and asking: encode a dataset once, standardise channels, save what ``ask`` needs.

A frozen vision front end (an HF tower in a :class:`~video2param.video.encoder.VisionEncoder`, or the demo's
:class:`~video2param.data.front_end.ObjectGridFrontEnd`) runs once per video; training then reads the features.
Channels are standardised with training-set statistics (a tower's channels carry constant offsets far larger
than the informative spread, and the demo front end's are small and sparse; both train poorly unscaled). The
statistics are part of the front end: :func:`save_vision` writes them next to its description so that
``video2param ask`` encodes a video file exactly as training did.

A saved vision directory holds ``feature_stats.json`` (mean and std per channel) plus either the demo front end's
``front_end.json`` or ``vision.json`` naming an HF vision tower (``{"tower": name_or_path}``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .front_end import ObjectGridFrontEnd, is_front_end_dir

STATS_FILE = "feature_stats.json"
TOWER_FILE = "vision.json"


@dataclass
class FeatureStandardizer:
    """Per-channel ``(x - mean) / std`` with statistics fitted on training features."""

    mean: torch.Tensor  # (Dv,)
    std: torch.Tensor  # (Dv,)

    @classmethod
    def fit(cls, features: Sequence[torch.Tensor], min_std: float = 1e-6) -> "FeatureStandardizer":
        """Statistics over every token of ``features`` (each ``(..., Dv)``); constant channels keep std ``min_std``."""
        flat = torch.cat([f.reshape(-1, f.shape[-1]).float() for f in features])
        return cls(flat.mean(0), flat.std(0).clamp_min(min_std))

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean.to(features)) / self.std.to(features)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / STATS_FILE
        path.write_text(json.dumps({"mean": self.mean.tolist(), "std": self.std.tolist()}) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "FeatureStandardizer":
        stats = json.loads((Path(directory) / STATS_FILE).read_text())
        return cls(torch.tensor(stats["mean"]), torch.tensor(stats["std"]))


def encode_dataset(dataset: Sequence, encoder: Any, batch: int = 128, progress: bool = True,
                   description: str = "encoding videos") -> list:
    """Encode every video of ``dataset`` once with the frozen ``encoder`` (a ``VisionEncoder``).

    Returns the items with ``video`` replaced by its features ``(T, P, Dv)``; questions and answers are kept.
    Shows a progress bar (elapsed time, ETA) unless ``progress=False``.
    """
    from tqdm.auto import tqdm

    out = []
    with torch.inference_mode(), tqdm(total=len(dataset), desc=description, unit="video", disable=not progress,
                                      leave=False, dynamic_ncols=True) as bar:
        for start in range(0, len(dataset), batch):
            chunk = [dataset[i] for i in range(start, min(start + batch, len(dataset)))]
            frames = torch.cat([item.video for item in chunk])  # (sum T, 3, H, W)
            features = encoder.encode_frames(frames)
            sizes = [item.video.shape[0] for item in chunk]
            out.extend(dataclasses.replace(item, video=f.clone()) for item, f in zip(chunk, features.split(sizes)))
            bar.update(len(chunk))
    return out


def standardize_items(standardizer: FeatureStandardizer, *item_lists: list) -> None:
    """Apply ``standardizer`` to the features of every item, in place."""
    for items in item_lists:
        for i, item in enumerate(items):
            items[i] = dataclasses.replace(item, video=standardizer(item.video))


def save_vision(directory: str | Path, standardizer: FeatureStandardizer, *,
                front_end: ObjectGridFrontEnd | None = None, tower: str | None = None) -> Path:
    """Write a vision directory for ``video2param ask``: the demo front end or an HF tower name, plus statistics."""
    if (front_end is None) == (tower is None):
        raise ValueError("save_vision: pass exactly one of front_end= and tower=")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if front_end is not None:
        front_end.save_pretrained(directory)
    else:
        (directory / TOWER_FILE).write_text(json.dumps({"tower": tower}) + "\n")
    standardizer.save(directory)
    return directory


def load_vision(name_or_dir: str | Path) -> tuple[Any, FeatureStandardizer | None]:
    """The ``VisionEncoder`` and the standardiser (None if not saved) of a vision directory or an HF tower name.

    Accepts a directory written by :func:`save_vision`, or anything ``VisionEncoder.from_pretrained`` loads.
    """
    from ..video.encoder import VisionEncoder

    path = Path(name_or_dir)
    standardizer = FeatureStandardizer.load(path) if (path / STATS_FILE).is_file() else None
    if is_front_end_dir(path):
        return ObjectGridFrontEnd.from_pretrained(path).vision_encoder(progress=False), standardizer
    if (path / TOWER_FILE).is_file():
        tower = json.loads((path / TOWER_FILE).read_text())["tower"]
        return VisionEncoder.from_pretrained(tower, progress=False), standardizer
    return VisionEncoder.from_pretrained(name_or_dir, progress=False), standardizer
