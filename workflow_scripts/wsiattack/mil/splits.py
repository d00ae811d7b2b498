"""Cross-validation folds: stratified by label, grouped by patient."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from wsiattack.errors import CohortError, ConfigError


def make_splits(samples: pd.DataFrame, *, folds: int, seed: int) -> pd.DataFrame:
    """Assign each slide the fold (0..folds-1) in which it is a test slide.

    ``samples`` has columns ``slide_id``, ``label`` and optionally ``patient_id``. All slides of a
    patient share a fold (slides of one patient are correlated, so splitting them would leak);
    without ``patient_id`` each slide is its own group and ``patient_id`` is set to ``slide_id``.
    Returns ``slide_id, label, patient_id, fold`` in the input's row order (and index).
    """
    if folds < 2:
        raise ConfigError(f"config: mil.folds must be >= 2, got {folds}")
    _check_columns(samples)
    groups = samples["patient_id"] if "patient_id" in samples.columns else samples["slide_id"]
    _check_enough_groups(labels=samples["label"], groups=groups, folds=folds)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold = np.full(len(samples), -1, dtype=np.int64)
    for fold_index, (_, test_rows) in enumerate(
        splitter.split(np.zeros(len(samples)), samples["label"].to_numpy(), groups.to_numpy())
    ):
        fold[test_rows] = fold_index
    empty = sorted(set(range(folds)) - set(fold.tolist()))
    if empty:  # StratifiedGroupKFold is greedy and can leave a fold empty with very uneven groups
        raise CohortError(f"folds {empty} received no slides; use fewer folds")
    return pd.DataFrame(
        {
            "slide_id": samples["slide_id"].to_numpy(),
            "label": samples["label"].to_numpy(),
            "patient_id": groups.to_numpy(),
            "fold": fold,
        },
        index=samples.index,
    )


def _check_columns(samples: pd.DataFrame) -> None:
    missing = [c for c in ("slide_id", "label") if c not in samples.columns]
    if missing:
        raise CohortError(f"samples lacks column(s) {missing} (has {list(samples.columns)})")
    present = [c for c in ("slide_id", "label", "patient_id") if c in samples.columns]
    for column in present:
        if samples[column].isna().any():
            raise CohortError(f"samples column {column!r} has missing values")
    duplicated = samples["slide_id"][samples["slide_id"].duplicated()].unique().tolist()
    if duplicated:
        raise CohortError(f"duplicate slide_id(s) in samples: {duplicated[:5]}")


def _check_enough_groups(*, labels: pd.Series, groups: pd.Series, folds: int) -> None:
    """Each class needs one slide (or patient) per fold so that every test fold can contain it."""
    unit = "patients" if groups.name == "patient_id" else "slides"
    groups_per_class = groups.groupby(labels.to_numpy()).nunique()
    too_few = groups_per_class[groups_per_class < folds]
    if not too_few.empty:
        details = ", ".join(f"class {label!r} has {count} {unit}" for label, count in too_few.items())
        raise CohortError(f"{details}; folds={folds} needs at least {folds} {unit} per class")


def inner_validation(train: pd.DataFrame, *, fraction: float, seed: int) -> pd.Series:
    """A boolean mask over ``train``'s rows: the inner validation slides for early stopping.

    About ``fraction`` of the training slides, stratified by label and grouped by ``patient_id``
    (one fold of a StratifiedGroupKFold with round(1 / fraction) folds), so that no patient has
    slides on both sides. Every class must keep a slide on both sides.
    """
    if not 0.0 < fraction < 0.5:
        raise ConfigError(f"config: mil.val_fraction must be in (0, 0.5) (or 0 for no validation), got {fraction}")
    n_splits = max(2, round(1.0 / fraction))
    groups = train["patient_id"] if "patient_id" in train.columns else train["slide_id"]
    try:
        _check_enough_groups(labels=train["label"], groups=groups, folds=n_splits)
    except ValueError as error:
        raise CohortError(
            f"inner validation split (val_fraction={fraction}): {error}; lower val_fraction or set it to 0"
        ) from None
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, val_rows = next(splitter.split(np.zeros(len(train)), train["label"].to_numpy(), groups.to_numpy()))
    mask = np.zeros(len(train), dtype=bool)
    mask[val_rows] = True
    for side, rows in (("validation", mask), ("training", ~mask)):
        missing = sorted(set(train["label"]) - set(train["label"][rows]))
        if missing:
            raise CohortError(f"the inner {side} split has no slide of class(es) {missing}; change val_fraction")
    return pd.Series(mask, index=train.index, name="validation")
