"""Detection of adversarial tiles from their embeddings, among the slide's own tiles.

A tile's score is the mean cosine distance of its embedding to its ``k`` nearest neighbours among
the other tiles of the same slide: a perturbed tile whose embedding moved away from the tissue
it shows becomes an outlier in its own slide, whatever the slide's overall appearance. The score
needs no labels and no other slide. The filter (``aggregation.FilteredHead``) drops the
``fraction`` most outlying tiles of each bag, so its false-positive rate on a clean bag is that
fraction; ``slide_detection`` reports, per attacked slide, the perturbed tiles it catches and
the in-slide AUROC of perturbed vs other tiles (``detector_roc``).

The adaptive attacker knows the detector: ``detection_aware`` adds to its objective a penalty on
the perturbed tile's score among the slide's clean tiles above their ``1 - fraction`` quantile
(``threshold_at_fpr``), the score above which the filter would drop it from a clean bag.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ObjectiveFn = Callable[[Tensor, Tensor], Tensor]


def knn_outlier_scores(features: Tensor, *, k: int, chunk_rows: int = 1024) -> Tensor:
    """Per tile (N,), the mean cosine distance to its k nearest other tiles (k capped at N - 1;
    0 for a bag of one). Row chunks bound memory at chunk_rows x N similarities."""
    n = len(features)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, n - 1)
    if k == 0:
        return features.new_zeros(n)
    unit = F.normalize(features.float(), dim=1)
    scores = []
    for start in range(0, n, chunk_rows):
        similarity = unit[start : start + chunk_rows] @ unit.T
        rows = torch.arange(start, min(start + chunk_rows, n), device=features.device)
        similarity[rows - start, rows] = -torch.inf  # not its own neighbour
        scores.append(1 - similarity.topk(k, dim=1).values.mean(dim=1))
    return torch.cat(scores)


def scores_against(embeddings: Tensor, *, reference: Tensor, k: int) -> Tensor:
    """Score of each of ``embeddings`` (m, D) among the ``reference`` tiles (N, D) of its slide
    (those rows excluded by the caller): differentiable, for the adaptive attacker."""
    similarity = F.normalize(embeddings.float(), dim=1) @ F.normalize(reference.float(), dim=1).T
    return 1 - similarity.topk(min(k, len(reference)), dim=1).values.mean(dim=1)


def n_dropped(n_tiles: int, fraction: float) -> int:
    """Tiles a bag of ``n_tiles`` loses to a drop-the-top-``fraction`` defence (never all)."""
    return min(math.ceil(fraction * n_tiles), n_tiles - 1)


def slide_detection(bag: Tensor, *, index: np.ndarray, fraction: float, k: int) -> dict[str, float]:
    """The detector on one attacked bag: how many of the perturbed rows ``index`` the filter
    drops (it drops the ``fraction`` most outlying tiles) and the in-slide AUROC of the perturbed
    rows' scores against the other tiles'."""
    scores = knn_outlier_scores(torch.as_tensor(bag, dtype=torch.float32), k=k).numpy()
    dropped = np.argsort(-scores, kind="stable")[: n_dropped(len(scores), fraction)]
    others = np.setdiff1d(np.arange(len(scores)), index)
    roc = detector_roc(clean_scores=scores[others], attacked_scores=scores[index], threshold=np.inf)
    return {"detected": int(np.isin(index, dropped).sum()), "detection_auroc": roc["auroc"]}


def threshold_at_fpr(clean_scores: np.ndarray, *, fpr: float) -> float:
    """The smallest threshold that flags (score > threshold) at most ``fpr`` of the clean tiles."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    return float(np.quantile(np.asarray(clean_scores, dtype=np.float64), 1 - fpr, method="higher"))


def detector_roc(*, clean_scores: np.ndarray, attacked_scores: np.ndarray, threshold: float) -> dict[str, float]:
    """AUROC of attacked vs clean tiles (ties count one half) and the rates at ``threshold``."""
    clean = np.asarray(clean_scores, dtype=np.float64)
    attacked = np.asarray(attacked_scores, dtype=np.float64)
    if len(clean) == 0 or len(attacked) == 0:
        raise ValueError("detector_roc needs clean and attacked scores")
    ordered = np.sort(clean)  # ranks by binary search: a cohort has millions of clean tiles
    below = np.searchsorted(ordered, attacked, side="left")
    ties = np.searchsorted(ordered, attacked, side="right") - below
    return {
        "auroc": float((below + 0.5 * ties).sum() / (len(attacked) * len(clean))),
        "tpr": float((attacked > threshold).mean()),
        "fpr": float((clean > threshold).mean()),
    }


def detection_aware(
    objective: ObjectiveFn, *, reference: Tensor, k: int, threshold: float, weight: float
) -> ObjectiveFn:
    """The adaptive attacker's objective: ``objective`` minus ``weight`` times how far each
    perturbed tile's score among the slide's clean tiles ``reference`` exceeds ``threshold``."""

    def evading(embedding: Tensor, clean: Tensor) -> Tensor:
        excess = (scores_against(embedding, reference=reference, k=k) - threshold).clamp_min(0)
        return objective(embedding, clean) - weight * excess

    return evading
