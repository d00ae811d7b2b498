"""Robust MIL aggregation: heads that wrap a trained head and keep its interface.

Each wrapper takes one bag (N, D) and returns ``(logits, tile_weights (N,))`` like every MIL
model (weights 0 on the tiles it left out), and has ``in_dim`` and ``n_classes``. So evaluation
predicts through it, and the gray-box oracle (``MILHead``) attacks through it unchanged: that is
the adaptive attacker, who differentiates through the tiles the defence keeps (the choice of
tiles itself is piecewise constant).

- ``DropTopAttended``: the bag is predicted again without its ``fraction`` most-attended tiles
  (at least one when fraction > 0, never all). An attack that works by drawing attention to a
  few tiles loses them; the clean cost is what the head loses without its most informative
  tiles.
- ``FilteredHead``: the bag is predicted without the tiles the in-slide outlier detector flags
  (:mod:`~wsiattack.defences.detection`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from wsiattack.defences.detection import knn_outlier_scores


class _KeepSubset(nn.Module):
    """Predict a subset of the bag (kept in tile order, which TransMIL's PPEG sees)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head, self.in_dim, self.n_classes = head, head.in_dim, head.n_classes

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        keep = torch.sort(self.kept_rows(features)).values
        logits, kept_weights = self.head(features[keep])
        weights = torch.zeros(len(features), dtype=kept_weights.dtype, device=features.device)
        return logits, weights.index_put((keep,), kept_weights)

    def kept_rows(self, features: Tensor) -> Tensor:
        raise NotImplementedError


class DropTopAttended(_KeepSubset):
    def __init__(self, head: nn.Module, *, fraction: float) -> None:
        super().__init__(head)
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"drop_top_attended fraction must be in [0, 1), got {fraction}")
        self.fraction = fraction

    def kept_rows(self, features: Tensor) -> Tensor:
        with torch.no_grad():
            _, weights = self.head(features)
        n_drop = min(math.ceil(self.fraction * len(features)), len(features) - 1)
        return torch.argsort(weights, descending=True, stable=True)[n_drop:]


class FilteredHead(_KeepSubset):
    """Drops tiles whose in-slide kNN outlier score exceeds ``threshold``; keeps the least
    outlying tile if every tile is flagged."""

    def __init__(self, head: nn.Module, *, k: int, threshold: float) -> None:
        super().__init__(head)
        self.k, self.threshold = k, threshold

    def kept_rows(self, features: Tensor) -> Tensor:
        with torch.no_grad():
            scores = knn_outlier_scores(features, k=self.k)
        kept = torch.nonzero(scores <= self.threshold).flatten()
        return kept if len(kept) else scores.argmin().view(1)
