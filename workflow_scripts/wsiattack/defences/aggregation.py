"""Robust MIL aggregation: heads that wrap a trained head and keep its interface.

Each wrapper takes one bag (N, D) and returns ``(logits, tile_weights (N,))`` like every MIL
model (weights 0 on the tiles it left out), and has ``in_dim`` and ``n_classes``. So evaluation
predicts through it, and the gray-box oracle (``MILHead``) attacks through it unchanged: that is
the adaptive attacker, who differentiates through the tiles the defence keeps. The choice of
tiles itself is piecewise constant, and a perturbed tile the defence drops has no gradient
through the head; so the adaptive attacker also pays a penalty for being dropped
(``drop_evasion``, scored as the defence scores the attacked bag).

- ``DropTopAttended``: the bag is predicted again without its ``fraction`` most-attended tiles
  (at least one when fraction > 0, never all). An attack that works by drawing attention to a
  few tiles loses them; the clean cost is what the head loses without its most informative
  tiles.
- ``FilteredHead``: the bag is predicted without the ``fraction`` of its tiles that the in-slide
  outlier detector (:mod:`~wsiattack.defences.detection`) ranks highest. Flagging a fixed share
  of each bag needs no calibration on other slides, and its false-positive rate on a clean bag is
  that share.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from wsiattack.defences.detection import ObjectiveFn, knn_outlier_scores, n_dropped


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


class _DropTop(_KeepSubset):
    """Drops the ``fraction`` highest-scoring tiles of the bag (at least one when fraction > 0,
    never all); subclasses say what the score is."""

    def __init__(self, head: nn.Module, *, fraction: float) -> None:
        super().__init__(head)
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"{type(self).__name__} fraction must be in [0, 1), got {fraction}")
        self.fraction = fraction

    def kept_rows(self, features: Tensor) -> Tensor:
        with torch.no_grad():
            scores = self.scores(features)
        return torch.argsort(scores, descending=True, stable=True)[n_dropped(len(features), self.fraction) :]

    def scores(self, features: Tensor) -> Tensor:
        raise NotImplementedError


class DropTopAttended(_DropTop):
    def scores(self, features: Tensor) -> Tensor:
        return self.head(features)[1]

    def evasion_scores(self, features: Tensor) -> Tensor:
        """Log attention: a penalty independent of the bag's size."""
        return self.scores(features).float().clamp_min(torch.finfo(torch.float32).tiny).log()


class FilteredHead(_DropTop):
    """Drops the tiles the in-slide detector ranks most outlying: on a clean bag exactly
    ``fraction`` of its tiles (the detector's false-positive rate, matched by construction)."""

    def __init__(self, head: nn.Module, *, fraction: float, k: int) -> None:
        super().__init__(head, fraction=fraction)
        self.k = k

    def scores(self, features: Tensor) -> Tensor:
        return knn_outlier_scores(features, k=self.k)

    def evasion_scores(self, features: Tensor) -> Tensor:
        return self.scores(features).float()


def drop_evasion(
    objective: ObjectiveFn, *, defended: _DropTop, bag: Tensor, rows: Tensor, weight: float
) -> ObjectiveFn:
    """The adaptive attacker's objective against a head that drops the top-scoring tiles:
    ``objective`` minus ``weight`` times how far each perturbed row of ``bag`` scores above the
    ``n_dropped``-th highest score of the bag's other rows (detached), scored as ``defended``
    scores the attacked bag (``evasion_scores``). A row below that line is kept whatever its
    neighbours in the batch do, and is not penalised; a row above it, whose gradient through the
    head is zero, is pushed down."""
    others = torch.ones(len(bag), dtype=torch.bool, device=bag.device).index_fill(0, rows, False)
    n_top = min(n_dropped(len(bag), defended.fraction), int(others.sum()))

    def evading(embedding: Tensor, clean: Tensor) -> Tensor:
        scores = defended.evasion_scores(bag.index_put((rows,), embedding.to(bag.dtype)))
        threshold = scores[others].detach().topk(n_top).values[-1] if n_top else scores.new_tensor(float("inf"))
        return objective(embedding, clean) - weight * (scores[rows] - threshold).clamp_min(0)

    return evading


def defended_head(module: nn.Module, defence: Mapping[str, Any] | None) -> nn.Module:
    """A trained head behind its head defence (unchanged without one, or for a tile defence)."""
    if not defence or defence["kind"] not in ("drop_top_attended", "knn_filter"):
        return module
    if defence["kind"] == "drop_top_attended":
        return DropTopAttended(module, fraction=defence["fraction"]).eval()
    return FilteredHead(module, fraction=defence["fraction"], k=defence["k"]).eval()
