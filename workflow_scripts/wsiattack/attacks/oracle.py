"""The gray-box oracle: a trained MIL head that never saw the slide, for the ``attention``
selection and the ``mil_cross_entropy`` objective.

For each slide the head is the one of the cross-validation fold in which the slide is a test
slide (``results/splits.csv``): it ranks and scores a slide it was not trained on, and it is the
head that evaluates the slide afterwards. The rule gets every fold's checkpoint of the chosen MIL
model (the fold is only known once the splits exist) and this module picks the slide's fold.
Torch-only: the perturb rule's environment has neither pandas nor scikit-learn.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsiattack.attacks.objectives import ObjectiveFn
from wsiattack.errors import AttackError, StoreError
from wsiattack.mil.training import load_mil_checkpoint
from wsiattack.runtime import exact_dtype


@dataclass(frozen=True)
class MILHead:
    """A trained head in eval mode with frozen weights, and the slide's true class index."""

    module: nn.Module
    target: int
    provenance: dict[str, Any] = field(default_factory=dict)  # model and fold, recorded in the attack store

    def objective_for(self, *, bag: torch.Tensor, rows: torch.Tensor) -> ObjectiveFn:
        """Slide-level cross-entropy with ``rows`` of the clean ``bag`` replaced by a batch's embeddings.

        Every tile of the batch gets the same (joint) value, so the methods' per-tile best iterate
        keeps the batch's tiles together; the batch sum's gradient is k times the slide's, a scale
        that every method normalises away (sign, unit norm, C&W's first-order gain).
        """

        def slide_cross_entropy(embedding: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
            attacked = bag.index_put((rows,), embedding.to(bag.dtype))  # out of place: bag stays clean
            logits, _ = self.module(attacked)
            return stable_cross_entropy(logits, target=self.target).expand(len(embedding))

        return slide_cross_entropy

    def check_bag(self, bag_dim: int, *, where: str) -> None:
        if bag_dim != self.module.in_dim:
            raise StoreError(
                f"{where}: clean features have {bag_dim} dimensions but the MIL head expects {self.module.in_dim}; re-run extraction and training"
            )


def stable_cross_entropy(logits: torch.Tensor, *, target: int) -> torch.Tensor:
    """Cross-entropy of one slide's ``logits`` (C,) whose gradient does not vanish when the head is sure.

    CE = softplus(m) with the log-softmax margin m = logsumexp of the other classes' logits minus
    the true one (log p(other) − log p(true)). CE's gradient is sigmoid(m) · ∇m: in float32 it
    underflows to exactly 0 once the logit gap passes ~88–103, and the attack would stop with a
    zero-gradient error on every slide the head is confident about. The value returned is CE
    (computed in the device's exact dtype, stored in the attack store as before); its gradient is
    ∇m, the same ascent direction without the vanishing factor. The sign and unit-norm methods
    take the same steps; C&W, which fixes its objective's scale once at the start, now weighs the
    objective against the distortion by ∇m rather than by the shrinking sigmoid(m)·∇m. The best
    iterate is ranked by the value, which is monotone in m; returned in float32, it is 0 past a
    margin of ~−103, where iterates tie and the earliest is kept (the gradient still moves on).
    """
    exact = logits.to(exact_dtype(logits.device))
    others = torch.cat([exact[:target], exact[target + 1 :]])
    margin = torch.logsumexp(others, dim=0) - exact[target]
    # value softplus(m) exactly (m − m.detach() is 0), gradient ∇m
    return (F.softplus(margin.detach()) + (margin - margin.detach())).float()


def load_fold_head(*, slide_id: str, splits_csv: str | Path, model_paths: Sequence[str | Path]) -> MILHead:
    """The head of the fold in which ``slide_id`` is a test slide, with the slide's label as target."""
    record = _split_record(splits_csv, slide_id=slide_id)
    fold = int(record["fold"])
    paths = [Path(p) for p in model_paths if Path(p).parent.name == f"fold{fold}"]
    if len(paths) != 1:
        raise AttackError(
            f"{slide_id}: is a test slide of fold {fold}, but {len(paths)} of the {len(model_paths)} MIL checkpoints given are of that fold"
        )
    module, meta = load_mil_checkpoint(paths[0])
    seen = {*meta.get("train_slides", ()), *meta.get("val_slides", ())}
    if meta.get("fold") != fold or slide_id in seen:
        raise StoreError(
            f"{paths[0]}: trained for fold {meta.get('fold')} on slides that include {slide_id!r} or not for fold {fold}; splits changed since training: re-run train_mil"
        )
    classes = list(meta["classes"])
    if record["label"] not in classes:
        raise AttackError(
            f"{slide_id}: label {record['label']!r} is not one of the head's classes ({', '.join(classes)})"
        )
    return MILHead(
        module=module.eval().requires_grad_(False),
        target=classes.index(record["label"]),
        provenance={"model": meta["model"], "fold": fold},
    )


def _split_record(splits_csv: str | Path, *, slide_id: str) -> dict[str, str]:
    with open(splits_csv, newline="") as handle:
        for record in csv.DictReader(handle):
            if record["slide_id"] == slide_id:
                return record
    raise AttackError(f"{slide_id}: not in {splits_csv}; re-run the split rule")
