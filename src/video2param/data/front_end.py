"""The demo's vision front end: per grid cell, a hand-made description of the object whose centre lies in it.

A real vision tower (CLIP, SigLIP) turns each image patch into a vector that says *what* is there and, with its
position in the grid, *where*. A random tower built from a config does not: it mixes away most of the signal (a
probe on its features reaches 60% on motion direction), so every method trained on it is judged on noise. This
front end gives the demo features with the properties of a good tower, computed by a fixed function of the pixels
(nothing learned, nothing to download), so any video file of coloured shapes on a dark background can be encoded
the same way at question time (``video2param ask``).

For each frame (``(3, H, W)`` in ``[0, 1]``, resized to ``image_size``):

1. foreground = pixels whose brightest channel exceeds ``threshold``;
2. objects = 8-connected components of the foreground with at least ``min_pixels`` pixels;
3. each object is described by one vector, written into the cell of a ``grid`` × ``grid`` patch grid that holds
   its centre; if two centres share a cell, the larger object keeps it and the other goes to the nearest free cell
   (its vector still holds its exact position); cells without an object are zero.

The vector of an object (width ``hidden_size`` = 9 + ``shape_bins``²):

=========  =====================================================================================================
presence   1.0
colour     mean RGB of its pixels (3)
position   centre (row, column), scaled to [-1, 1] over the frame (2)
size       bounding-box height and width in cells, and pixel count in cells (3)
shape      occupancy of a ``shape_bins`` × ``shape_bins`` grid laid over its bounding box (translation and scale
           invariant: a square fills every bin, a cross only the middle row and column, ...)
=========  =====================================================================================================

The front end is an ``nn.Module`` with the contract :class:`~video2param.video.encoder.VisionEncoder` expects
(``forward(pixel_values)`` → ``(n, grid², hidden_size)``); :meth:`ObjectGridFrontEnd.vision_encoder` wraps it with
the right preprocessing. It saves as one JSON file (:meth:`save_pretrained`), which ``video2param ask --vision DIR``
recognises.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: File that marks a directory as a saved :class:`ObjectGridFrontEnd`.
FRONT_END_FILE = "front_end.json"
#: Channels of an object's vector (unstandardised): presence (1 where a cell holds an object, else 0) and mean RGB.
PRESENCE = 0
COLOUR = slice(1, 4)
_KIND = "video2param.object_grid"


@dataclass
class ObjectGridConfig:
    """Settings of :class:`ObjectGridFrontEnd`."""

    image_size: int = field(default=32, metadata={"help": "Frames are resized to image_size × image_size first."})
    grid: int = field(default=2, metadata={"help": "Cells per side of the patch grid (grid² tokens per frame)."})
    shape_bins: int = field(default=4, metadata={"help": "Bins per side of the bounding-box occupancy grid."})
    threshold: float = field(default=0.3, metadata={"help": "A pixel is foreground when its brightest channel "
                                                            "exceeds this (pixels in [0, 1])."})
    min_pixels: int = field(default=4, metadata={"help": "Smaller components are noise and are ignored."})

    def __post_init__(self) -> None:
        for name in ("image_size", "grid", "shape_bins", "min_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.image_size % self.grid:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of grid ({self.grid})")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold: expected a value in (0, 1), got {self.threshold!r}")


class ObjectGridFrontEnd(nn.Module):
    """Frames → per-cell object descriptions ``(n, grid², hidden_size)``; fixed, no parameters."""

    def __init__(self, config: ObjectGridConfig | None = None) -> None:
        super().__init__()
        self.config = config or ObjectGridConfig()

    @property
    def hidden_size(self) -> int:
        """Width of one token's vector."""
        return 9 + self.config.shape_bins**2

    @property
    def num_patches(self) -> int:
        """Tokens per frame."""
        return self.config.grid**2

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> torch.Tensor:
        """``(n, 3, H, W)`` frames in ``[0, 1]`` (already at ``image_size``) → ``(n, grid², hidden_size)``."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values: expected (n, 3, H, W), got {tuple(pixel_values.shape)}")
        x = pixel_values.float()
        n, _, height, width = x.shape
        cfg = self.config
        mask = x.amax(1) > cfg.threshold  # (n, H, W)
        labels = _connected_components(mask)  # (n, H, W), 0 = background, else the component's largest pixel id
        bins = height * width + 1  # one accumulator row per possible label, per frame
        row = (labels + bins * torch.arange(n).view(n, 1, 1)).flatten()  # accumulator row of every pixel
        fg = mask.flatten()
        ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                                indexing="ij")
        ys, xs = ys.flatten().repeat(n), xs.flatten().repeat(n)
        fg_row, fg_y, fg_x = row[fg], ys[fg], xs[fg]
        rgb = x.permute(0, 2, 3, 1).reshape(-1, 3)[fg]

        def scatter_sum(values: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(n * bins, *values.shape[1:])
            return out.index_add_(0, fg_row, values)

        def scatter_extreme(values: torch.Tensor, reduce: str) -> torch.Tensor:
            return torch.zeros(n * bins).scatter_reduce_(0, fg_row, values, reduce, include_self=False)

        count = scatter_sum(torch.ones_like(fg_y))
        objects = torch.nonzero(count >= cfg.min_pixels).flatten()  # accumulator rows that are real objects
        out = torch.zeros(n * self.num_patches, self.hidden_size)
        if objects.numel() == 0:
            return out.view(n, self.num_patches, self.hidden_size)
        k = count[objects]
        centre_y = scatter_sum(fg_y)[objects] / k + 0.5
        centre_x = scatter_sum(fg_x)[objects] / k + 0.5
        colour = scatter_sum(rgb)[objects] / k[:, None]
        top, bottom = scatter_extreme(fg_y, "amin")[objects], scatter_extreme(fg_y, "amax")[objects] + 1
        left, right = scatter_extreme(fg_x, "amin")[objects], scatter_extreme(fg_x, "amax")[objects] + 1
        shape = self._occupancy(fg_row, fg_y, fg_x, objects, n * bins, top, bottom, left, right)
        cell_px = height / cfg.grid
        features = torch.cat([  # PRESENCE, COLOUR, then the rest in the order of the module docstring
            torch.ones_like(k)[:, None],
            colour,
            torch.stack([2 * centre_y / height - 1, 2 * centre_x / width - 1], 1),
            torch.stack([(bottom - top) / cell_px, (right - left) / cell_px, k / cell_px**2], 1),
            shape,
        ], 1)
        frame = objects // bins
        cell_row = (centre_y * cfg.grid / height).long().clamp_(0, cfg.grid - 1)
        cell_col = (centre_x * cfg.grid / width).long().clamp_(0, cfg.grid - 1)
        slot = frame * self.num_patches + cell_row * cfg.grid + cell_col
        # One object per cell: the largest (ties broken by label) keeps its cell, so the result never depends on
        # write order; the others move to the nearest free cell of their frame (rare: two centres in one cell).
        rank = k * bins + objects % bins
        best = torch.zeros(out.shape[0]).scatter_reduce_(0, slot, rank, "amax", include_self=False)
        keep = rank == best[slot]
        out[slot[keep]] = features[keep]
        if not bool(keep.all()):
            self._place_displaced(out, features, frame, centre_y / height, centre_x / width, slot, keep, rank)
        return out.view(n, self.num_patches, self.hidden_size)

    def _place_displaced(self, out, features, frame, row_frac, col_frac, slot, keep, rank) -> None:
        """Write each object that lost its cell into the free cell of its frame nearest to its centre."""
        grid = self.config.grid
        centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
        cell_rows, cell_cols = centres.repeat_interleave(grid), centres.repeat(grid)
        taken = {int(s) for s in slot[keep]}
        for i in sorted(torch.nonzero(~keep).flatten().tolist(), key=lambda j: -float(rank[j])):
            first = int(frame[i]) * self.num_patches
            distance = (cell_rows - row_frac[i]) ** 2 + (cell_cols - col_frac[i]) ** 2
            for cell in torch.argsort(distance, stable=True).tolist():
                if first + cell not in taken:
                    taken.add(first + cell)
                    out[first + cell] = features[i]
                    break  # more objects than cells: the smallest ones are dropped

    def _occupancy(self, fg_row, fg_y, fg_x, objects, rows, top, bottom, left, right) -> torch.Tensor:
        """Fraction of each bin of the object's bounding box that its pixels cover, ``(objects, bins²)``."""
        s = self.config.shape_bins
        index = torch.full((rows,), -1, dtype=torch.long)
        index[objects] = torch.arange(objects.numel())
        obj = index[fg_row]
        keep = obj >= 0
        obj, y, x = obj[keep], fg_y[keep], fg_x[keep]
        u = ((y - top[obj] + 0.5) / (bottom - top)[obj] * s).long().clamp_(0, s - 1)
        v = ((x - left[obj] + 0.5) / (right - left)[obj] * s).long().clamp_(0, s - 1)
        hits = torch.zeros(objects.numel() * s * s).index_add_(0, obj * s * s + u * s + v, torch.ones_like(y))
        capacity = ((bottom - top) * (right - left) / (s * s)).clamp_min(1.0)
        return (hits.view(-1, s * s) / capacity[:, None]).clamp_(max=1.0)

    # -- saving, loading, wrapping ---------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``front_end.json`` (the whole front end: it has no weights)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"kind": _KIND, "config": dataclasses.asdict(self.config)}
        (directory / FRONT_END_FILE).write_text(json.dumps(payload, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ObjectGridFrontEnd":
        """Load a front end written by :meth:`save_pretrained`."""
        path = Path(directory) / FRONT_END_FILE
        payload: dict[str, Any] = json.loads(path.read_text())
        if payload.get("kind") != _KIND:
            raise ValueError(f"{path}: not an object-grid front end (kind {payload.get('kind')!r})")
        return cls(ObjectGridConfig(**payload["config"]))

    def vision_encoder(self, **kwargs: Any):
        """This front end as a :class:`~video2param.video.encoder.VisionEncoder` (pixels in [0, 1], area resize)."""
        from ..video.encoder import FramePreprocessing, VisionEncoder

        size = self.config.image_size
        pre = FramePreprocessing((size, size), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), shortest_edge=None,
                                 interpolation="area")
        return VisionEncoder(self, preprocessing=pre, hidden_layer=None, drop_cls=False, **kwargs)


def is_front_end_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by :meth:`ObjectGridFrontEnd.save_pretrained`."""
    return (Path(path) / FRONT_END_FILE).is_file()


def _connected_components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected components of a boolean ``(n, H, W)`` mask; each labelled by its largest pixel id (1-based)."""
    n, height, width = mask.shape
    ids = torch.arange(1, height * width + 1, dtype=torch.float32).view(1, 1, height, width)
    keep = mask[:, None].float()
    labels = ids * keep
    # Spread the largest id through each component; at most its geodesic diameter in steps (~10 for the demo).
    for _ in range(height * width):
        spread = F.max_pool2d(labels, 3, stride=1, padding=1) * keep
        if torch.equal(spread, labels):
            break
        labels = spread
    return labels[:, 0].long()
