"""One cross-validation fold's MIL head: trained on the clean features of the slides outside the fold."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from wsiattack import stores
from wsiattack.mil.splits import inner_validation
from wsiattack.mil.training import MILTrainingSpec, save_mil_checkpoint, train_mil

log = logging.getLogger(__name__)


class FeatureBags(Mapping[str, np.ndarray]):
    """Each slide's clean features by slide id, read from its store when asked for.

    Nothing is held but the open arrays, so a job's peak memory is that of the bags it holds at
    once (one, for training and evaluation), not of the cohort: 1 000 slides of 15 k tiles of a
    1 024-d encoder are 60 GB. ``n_tiles`` reads only the array's shape.
    """

    def __init__(self, paths: Sequence[str | Path]):
        self._paths = {stores.slide_id_of(p): Path(p) for p in paths}
        self._arrays: dict[str, Any] = {}

    def _array(self, slide_id: str):
        if slide_id not in self._arrays:
            self._arrays[slide_id] = stores.open_store(self._paths[slide_id], kind=stores.FEATURES)["features"]
        return self._arrays[slide_id]

    def __getitem__(self, slide_id: str) -> np.ndarray:
        return np.asarray(self._array(slide_id)[...])

    def __iter__(self):
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def n_tiles(self, slide_id: str) -> int:
        return int(self._array(slide_id).shape[0])


class LazyBags(Sequence[torch.Tensor]):
    """The bags of ``slide_ids``, each read when indexed (``train_mil`` takes one per step)."""

    def __init__(self, features: Mapping[str, np.ndarray], slide_ids: Sequence[str]):
        self._features, self._slide_ids = features, list(slide_ids)

    def __getitem__(self, index):  # noqa: ANN001 (int; slices are not needed)
        return torch.from_numpy(self._features[self._slide_ids[index]])

    def __len__(self) -> int:
        return len(self._slide_ids)


def read_features(paths: Sequence[str | Path]) -> FeatureBags:
    return FeatureBags(paths)


def _n_tiles(features: Mapping[str, np.ndarray], slide_id: str) -> int:
    return features.n_tiles(slide_id) if isinstance(features, FeatureBags) else len(features[slide_id])


def usable(splits: pd.DataFrame, features: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Slides with at least one tile; slides skipped for lack of tissue have empty bags."""
    return splits[[_n_tiles(features, s) > 0 for s in splits["slide_id"]]]


@dataclass(frozen=True)
class FoldData:
    """One fold's training and validation slides (rows of the splits table), their training seed,
    and the class names; what every head trained on the fold sees (clean or backdoored)."""

    train: pd.DataFrame
    val: pd.DataFrame
    seed: int
    classes: list[str]

    def bags_and_labels(self, rows: pd.DataFrame, features: Mapping[str, np.ndarray]) -> tuple[LazyBags, list[int]]:
        return LazyBags(features, rows["slide_id"]), [self.classes.index(label) for label in rows["label"]]


def fold_data(splits: pd.DataFrame, features: Mapping[str, np.ndarray], *, spec: Mapping[str, Any]) -> FoldData:
    """The slides outside test fold ``spec['fold']`` that have tiles, split into training and (with
    ``spec['val_fraction'] > 0``) an inner validation part, by patient and stratified."""
    fold_train = usable(splits, features)
    fold_train = fold_train[fold_train["fold"] != spec["fold"]]
    seed = spec["seed"] + spec["fold"]
    is_val = (
        inner_validation(fold_train, fraction=spec["val_fraction"], seed=seed)
        if spec["val_fraction"] > 0
        else pd.Series(False, index=fold_train.index)
    )
    return FoldData(train=fold_train[~is_val], val=fold_train[is_val], seed=seed, classes=list(spec["classes"]))


def training_spec(spec: Mapping[str, Any], *, seed: int) -> MILTrainingSpec:
    return MILTrainingSpec(
        model=spec["model"],
        epochs=spec["epochs"],
        lr=spec["lr"],
        weight_decay=spec["weight_decay"],
        seed=seed,
        patience=spec["patience"],
        hparams=spec.get("hparams", {}),
    )


def train_fold(
    *,
    splits_csv: str | Path,
    feature_stores: Sequence[str | Path],
    spec: Mapping[str, Any],
    out_model: str | Path,
    device: torch.device | str = "cpu",
) -> None:
    """Train one MIL head on the clean features of every slide not in test fold ``spec['fold']``,
    on ``device``.

    With ``spec['val_fraction'] > 0`` an inner split of those slides (by patient, stratified)
    early-stops the training; the test fold is never seen.
    """
    splits = pd.read_csv(splits_csv, dtype={"slide_id": str})
    features = read_features(feature_stores)
    data = fold_data(splits, features, spec=spec)
    bags, labels = data.bags_and_labels(data.train, features)
    val_bags, val_labels = data.bags_and_labels(data.val, features)
    result = train_mil(
        bags=bags,
        labels=labels,
        n_classes=len(data.classes),
        spec=training_spec(spec, seed=data.seed),
        val_bags=val_bags,
        val_labels=val_labels,
        device=device,
    )
    meta = {
        "fold": spec["fold"],
        "classes": data.classes,
        "train_slides": list(data.train["slide_id"]),
        "val_slides": list(data.val["slide_id"]),
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
