"""A map-style dataset of ready feature rows and its collator, shared by the Trainer tests (one and two processes)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class FeatureRows(Dataset):
    """Rows of (input_ids, attention_mask, labels, videos) as HF Trainer feeds them; labels are -100 on padding."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, feats: torch.Tensor) -> None:
        self.ids, self.mask, self.feats = ids, mask, feats
        self.labels = ids.masked_fill(mask == 0, -100)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i],
                "videos": self.feats[i]}


def stack_rows(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
