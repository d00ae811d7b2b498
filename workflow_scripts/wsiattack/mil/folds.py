"""One cross-validation fold's MIL head: trained on the clean features of the slides outside the fold."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from wsiattack import stores
from wsiattack.mil.splits import inner_validation
from wsiattack.mil.training import MILTrainingSpec, save_mil_checkpoint, train_mil

log = logging.getLogger(__name__)


def read_features(paths: Sequence[str | Path]) -> dict[str, np.ndarray]:
    return {
        stores.slide_id_of(p): np.asarray(stores.open_store(p, kind=stores.FEATURES)["features"][...]) for p in paths
    }


def usable(splits: pd.DataFrame, features: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Slides with at least one tile; slides skipped for lack of tissue have empty bags."""
    return splits[[len(features[s]) > 0 for s in splits["slide_id"]]]


def train_fold(
    *, splits_csv: str | Path, feature_stores: Sequence[str | Path], spec: Mapping[str, Any], out_model: str | Path
) -> None:
    """Train one MIL head on the clean features of every slide not in test fold ``spec['fold']``.

    With ``spec['val_fraction'] > 0`` an inner split of those slides (by patient, stratified)
    early-stops the training; the test fold is never seen.
    """
    splits = pd.read_csv(splits_csv, dtype={"slide_id": str})
    features = read_features(feature_stores)
    fold_train = usable(splits, features)
    fold_train = fold_train[fold_train["fold"] != spec["fold"]]
    seed = spec["seed"] + spec["fold"]
    is_val = (
        inner_validation(fold_train, fraction=spec["val_fraction"], seed=seed)
        if spec["val_fraction"] > 0
        else pd.Series(False, index=fold_train.index)
    )
    classes = list(spec["classes"])
    train, val = fold_train[~is_val], fold_train[is_val]

    def bags_and_labels(rows: pd.DataFrame) -> tuple[list[torch.Tensor], list[int]]:
        return [torch.from_numpy(features[s]) for s in rows["slide_id"]], [
            classes.index(label) for label in rows["label"]
        ]

    bags, labels = bags_and_labels(train)
    val_bags, val_labels = bags_and_labels(val)
    training = MILTrainingSpec(
        model=spec["model"],
        epochs=spec["epochs"],
        lr=spec["lr"],
        weight_decay=spec["weight_decay"],
        seed=seed,
        patience=spec["patience"],
        hparams=spec.get("hparams", {}),
    )
    result = train_mil(
        bags=bags, labels=labels, n_classes=len(classes), spec=training, val_bags=val_bags, val_labels=val_labels
    )
    meta = {
        "fold": spec["fold"],
        "classes": classes,
        "train_slides": list(train["slide_id"]),
        "val_slides": list(val["slide_id"]),
        "training": result.record(),
        "spec": dict(spec),
    }
    save_mil_checkpoint(Path(out_model), model=result.model, meta=meta)
    log.info(
        "fold %d: trained %s on %d slides (%d validation), kept epoch %d of %d",
        spec["fold"],
        spec["model"],
        len(bags),
        len(val_bags),
        result.best_epoch,
        result.epochs_run,
    )
