"""Slide-level classification metrics and the clean-vs-attacked summary with bootstrap CIs."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from wsiattack.errors import CohortError, ConfigError

CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "auroc")
SUMMARY_METRICS = (*CLASSIFICATION_METRICS, "flip_rate")
SUMMARY_COLUMNS = ("metric", "clean", "attacked", "drop", "drop_ci_low", "drop_ci_high", "n_slides")
CI_PERCENTILES = (2.5, 97.5)


def classification_metrics(
    *, y_true: np.ndarray, prob: np.ndarray, y_pred: np.ndarray, n_classes: int
) -> dict[str, float]:
    """accuracy, balanced_accuracy, f1_macro and auroc of predicted class indices / probabilities.

    balanced_accuracy and f1_macro average over the classes that occur (sklearn's defaults).
    AUROC is NaN, not an error, unless every class 0..n_classes-1 occurs in ``y_true``: binary
    AUROC needs both classes and macro one-vs-rest AUROC needs a positive for every class.
    """
    y_true, y_pred, prob = np.asarray(y_true), np.asarray(y_pred), np.asarray(prob, dtype=np.float64)
    if n_classes < 2 or prob.shape != (len(y_true), n_classes) or y_pred.shape != y_true.shape or len(y_true) == 0:
        raise CohortError(
            f"need n_classes >= 2 and non-empty y_true, y_pred (n,) with prob (n, n_classes); got n_classes="
            f"{n_classes}, y_true {y_true.shape}, y_pred {y_pred.shape}, prob {prob.shape}"
        )
    with warnings.catch_warnings():
        # Expected in small cohorts and bootstrap resamples; the metric is still well defined.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found in 'y_true' and 'y_pred'")
        balanced_accuracy = balanced_accuracy_score(y_true, y_pred)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy),
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0.0)),
        "auroc": _auroc(y_true=y_true, prob=prob, n_classes=n_classes),
    }


def _auroc(*, y_true: np.ndarray, prob: np.ndarray, n_classes: int) -> float:
    if not np.isin(np.arange(n_classes), y_true).all():
        return float("nan")
    if n_classes == 2:
        return float(roc_auc_score(y_true, prob[:, 1]))
    return float(roc_auc_score(y_true, prob, multi_class="ovr", average="macro", labels=np.arange(n_classes)))


@dataclass(frozen=True)
class _PairedPredictions:
    """Clean and attacked predictions of the same slides, row-aligned."""

    y_true: np.ndarray
    clean_prob: np.ndarray
    attacked_prob: np.ndarray
    clean_pred: np.ndarray
    attacked_pred: np.ndarray

    def subset(self, rows: np.ndarray) -> _PairedPredictions:
        return _PairedPredictions(
            y_true=self.y_true[rows],
            clean_prob=self.clean_prob[rows],
            attacked_prob=self.attacked_prob[rows],
            clean_pred=self.clean_pred[rows],
            attacked_pred=self.attacked_pred[rows],
        )

    def clean_and_attacked(self, *, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """Values in SUMMARY_METRICS order; flip_rate is (0, flip rate)."""
        clean = classification_metrics(
            y_true=self.y_true, prob=self.clean_prob, y_pred=self.clean_pred, n_classes=n_classes
        )
        attacked = classification_metrics(
            y_true=self.y_true, prob=self.attacked_prob, y_pred=self.attacked_pred, n_classes=n_classes
        )
        flip_rate = float(np.mean(self.clean_pred != self.attacked_pred))
        return (
            np.array([*(clean[m] for m in CLASSIFICATION_METRICS), 0.0]),
            np.array([*(attacked[m] for m in CLASSIFICATION_METRICS), flip_rate]),
        )


def summarize_attack(
    eval_df: pd.DataFrame,
    *,
    classes: Sequence[str],
    n_bootstrap: int,
    seed: int,
    patients: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Clean vs. attacked metrics of one (encoder, MIL model, attack) with paired bootstrap CIs of the drop.

    ``eval_df`` has one row per slide: ``slide_id, label, label_idx, clean_pred, attacked_pred``
    (class indices into ``classes``) and ``clean_prob_{c}``, ``attacked_prob_{c}`` per class c;
    other columns are ignored. Returns one row per metric (accuracy, balanced_accuracy, f1_macro,
    auroc, flip_rate) with columns ``metric, clean, attacked, drop, drop_ci_low, drop_ci_high,
    n_slides``, where drop = clean - attacked (positive = the attack hurt). For ``flip_rate`` (the
    fraction of slides whose predicted class changed) clean is 0.0 and attacked is the flip rate,
    so its drop is minus the flip rate. CIs are 95 % percentile intervals of the drop over
    ``n_bootstrap`` paired resamples of slides (numpy ``default_rng(seed)``); resamples where a
    metric is undefined (e.g. AUROC with a missing class) are skipped for that metric; with
    ``n_bootstrap == 0`` the CIs are NaN. The flip rate's interval is the exact Clopper–Pearson
    one instead (a count of flips out of n slides: the bootstrap gives [0, 0] for 0 flips, while
    0 of 20 only bounds the rate below 16.8 %), whatever ``n_bootstrap``. With ``patients``
    (slide id -> patient id) the bootstrap resamples patients, each with all its slides: slides of
    one patient are not independent. One slide per patient gives the slide bootstrap, draw for
    draw.
    """
    if n_bootstrap < 0:
        raise ConfigError(f"config: evaluation.n_bootstrap must be >= 0, got {n_bootstrap}")
    predictions = _paired_predictions(eval_df, classes=classes)
    clean, attacked = predictions.clean_and_attacked(n_classes=len(classes))
    groups = _patient_groups(eval_df["slide_id"].astype(str), patients)
    drops = _bootstrap_drops(predictions, n_classes=len(classes), n_bootstrap=n_bootstrap, seed=seed, groups=groups)
    ci_low, ci_high = _percentile_intervals(drops)
    flips = int(np.sum(predictions.clean_pred != predictions.attacked_pred))
    flip_low, flip_high = clopper_pearson(flips, len(predictions.y_true))
    flip_row = SUMMARY_METRICS.index("flip_rate")
    ci_low[flip_row], ci_high[flip_row] = -flip_high, 0.0 - flip_low  # drop = −flip rate (0.0 −: no "-0" in the CSV)
    return pd.DataFrame(
        {
            "metric": list(SUMMARY_METRICS),
            "clean": clean,
            "attacked": attacked,
            "drop": clean - attacked,
            "drop_ci_low": ci_low,
            "drop_ci_high": ci_high,
            "n_slides": len(predictions.y_true),
        },
        columns=list(SUMMARY_COLUMNS),
    )


def clopper_pearson(successes: int, n: int, *, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper–Pearson) two-sided interval of a binomial proportion."""
    from scipy.stats import beta

    alpha = 1 - level
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, n - successes + 1))
    high = 1.0 if successes == n else float(beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    return low, high


def _patient_groups(slide_ids: pd.Series, patients: Mapping[str, str] | None) -> np.ndarray:
    """Per slide, the index of its patient (in order of first appearance); each slide its own
    patient without a mapping."""
    if patients is None:
        return np.arange(len(slide_ids))
    missing = [s for s in slide_ids if s not in patients]
    if missing:
        raise CohortError(f"no patient_id for slide(s) {missing[:3]} in the splits")
    return pd.factorize(np.asarray([patients[s] for s in slide_ids]))[0]


def _bootstrap_drops(
    predictions: _PairedPredictions, *, n_classes: int, n_bootstrap: int, seed: int, groups: np.ndarray | None = None
) -> np.ndarray:
    """(n_bootstrap, n_metrics) drops; clean and attacked share each resample (paired).

    A resample is a vector of counts (how often each slide was drawn), and every metric is
    computed for all resamples at once from those counts: the same values as the metric of the
    resampled table (sklearn's, checked in the tests), at a thousandth of the cost, so that a
    factor study's summary does not take minutes per attack.
    """
    n_slides = len(predictions.y_true)
    counts = bootstrap_counts(np.arange(n_slides) if groups is None else groups, n_bootstrap=n_bootstrap, seed=seed)
    clean = _weighted_metrics(
        counts,
        y_true=predictions.y_true,
        prob=predictions.clean_prob,
        y_pred=predictions.clean_pred,
        n_classes=n_classes,
    )
    attacked = _weighted_metrics(
        counts,
        y_true=predictions.y_true,
        prob=predictions.attacked_prob,
        y_pred=predictions.attacked_pred,
        n_classes=n_classes,
    )
    flip_rate = counts @ (predictions.clean_pred != predictions.attacked_pred) / counts.sum(axis=1)
    return np.column_stack([clean - attacked, -flip_rate]) if n_bootstrap else np.empty((0, len(SUMMARY_METRICS)))


def bootstrap_counts(groups: np.ndarray, *, n_bootstrap: int, seed: int) -> np.ndarray:
    """(n_bootstrap, n_slides) how often each slide is drawn in each resample of its patients
    (``groups``: per slide, its patient's index; a slide is drawn as often as its patient)."""
    rng = np.random.default_rng(seed)
    groups = np.asarray(groups)
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    draws = rng.integers(0, n_groups, size=(n_bootstrap, n_groups))
    group_counts = np.zeros((n_bootstrap, n_groups))
    np.add.at(group_counts, (np.arange(n_bootstrap)[:, None], draws), 1.0)
    return group_counts[:, groups]


def mean_difference(
    first: np.ndarray,
    second: np.ndarray,
    *,
    slide_ids: pd.Series,
    n_bootstrap: int,
    seed: int,
    patients: Mapping[str, str] | None = None,
) -> tuple[float, float, float]:
    """Mean over slides of ``first - second`` (paired per slide) and its 95 % percentile interval
    over ``n_bootstrap`` resamples of patients (NaN without resamples)."""
    differences = np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)
    value = float(differences.mean())
    if not n_bootstrap:
        return value, np.nan, np.nan
    groups = _patient_groups(slide_ids.astype(str), patients)
    counts = bootstrap_counts(groups, n_bootstrap=n_bootstrap, seed=seed)
    low, high = np.percentile(counts @ differences / counts.sum(axis=1), CI_PERCENTILES)
    return value, float(low), float(high)


def _weighted_metrics(
    counts: np.ndarray, *, y_true: np.ndarray, prob: np.ndarray, y_pred: np.ndarray, n_classes: int
) -> np.ndarray:
    """(B, 4) CLASSIFICATION_METRICS of B resamples given as slide counts (B, n). Classes absent
    from both labels and predictions of a resample are left out of the macro averages, as sklearn
    does; AUROC is NaN where a class is missing."""
    classes = np.arange(n_classes)
    is_true = (y_true[:, None] == classes).astype(float)  # (n, C)
    is_pred = (y_pred[:, None] == classes).astype(float)
    support, predicted = counts @ is_true, counts @ is_pred  # (B, C)
    hits = counts @ (is_true * is_pred)
    total = counts.sum(axis=1)
    accuracy = hits.sum(axis=1) / total
    with np.errstate(invalid="ignore", divide="ignore"):
        balanced = np.nanmean(np.where(support > 0, hits / support, np.nan), axis=1)
        present = (support + predicted) > 0
        f1 = np.where(present, 2 * hits / (support + predicted), 0.0).sum(axis=1) / present.sum(axis=1)
    if n_classes == 2:
        auroc = _weighted_auroc(counts, positive=y_true == 1, score=prob[:, 1])
    else:
        auroc = np.mean([_weighted_auroc(counts, positive=y_true == c, score=prob[:, c]) for c in classes], axis=0)
    auroc[(support == 0).any(axis=1)] = np.nan
    return np.column_stack([accuracy, balanced, f1, auroc])


def _weighted_auroc(counts: np.ndarray, *, positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """AUROC of each resample: the Mann–Whitney statistic (ties count one half), i.e. the area
    under the trapezoidal ROC curve, with every slide weighted by its count."""
    order = np.argsort(score, kind="stable")
    sorted_score = score[order]
    starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])  # one group per distinct score
    weights = counts[:, order]
    pos_at = np.add.reduceat(weights * positive[order], starts, axis=1)  # (B, distinct scores)
    neg_at = np.add.reduceat(weights * ~positive[order], starts, axis=1)
    neg_below = np.cumsum(neg_at, axis=1) - neg_at
    pairs = pos_at.sum(axis=1) * neg_at.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos_at * (neg_below + 0.5 * neg_at)).sum(axis=1) / pairs


def _percentile_intervals(drops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    low = np.full(drops.shape[1], np.nan)
    high = np.full(drops.shape[1], np.nan)
    for column in range(drops.shape[1]):
        defined = drops[:, column][~np.isnan(drops[:, column])]
        if defined.size:
            low[column], high[column] = np.percentile(defined, CI_PERCENTILES)
    return low, high


def _paired_predictions(eval_df: pd.DataFrame, *, classes: Sequence[str]) -> _PairedPredictions:
    classes = list(classes)
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ConfigError(f"config: classes must be >= 2 distinct names, got {classes}")
    prob_columns = {kind: [f"{kind}_prob_{c}" for c in classes] for kind in ("clean", "attacked")}
    required = ["slide_id", "label", "label_idx", "clean_pred", "attacked_pred"]
    required += [*prob_columns["clean"], *prob_columns["attacked"]]
    missing = [c for c in required if c not in eval_df.columns]
    if missing:
        raise CohortError(f"eval table lacks column(s) {missing}")
    if eval_df.empty:
        raise CohortError("eval table has no slides")
    if eval_df["slide_id"].duplicated().any():
        raise CohortError("eval table has more than one row per slide_id")
    y_true, clean_pred, attacked_pred = (
        _class_indices(eval_df[c], n_classes=len(classes)) for c in ("label_idx", "clean_pred", "attacked_pred")
    )
    # A label/label_idx mismatch means the classes were passed in a different order than used upstream.
    if (eval_df["label"].astype(str).to_numpy() != np.asarray(classes, dtype=str)[y_true]).any():
        raise CohortError(f"label does not match classes[label_idx] for classes={classes}")
    return _PairedPredictions(
        y_true=y_true,
        clean_prob=eval_df[prob_columns["clean"]].to_numpy(dtype=np.float64),
        attacked_prob=eval_df[prob_columns["attacked"]].to_numpy(dtype=np.float64),
        clean_pred=clean_pred,
        attacked_pred=attacked_pred,
    )


def _class_indices(column: pd.Series, *, n_classes: int) -> np.ndarray:
    if not pd.api.types.is_integer_dtype(column):
        raise CohortError(f"eval table column {column.name!r} must hold integer class indices, got {column.dtype}")
    indices = column.to_numpy(dtype=np.int64)
    if indices.min() < 0 or indices.max() >= n_classes:
        raise CohortError(f"eval table column {column.name!r} has class indices outside [0, {n_classes})")
    return indices


def embedding_shift(eval_df: pd.DataFrame) -> pd.DataFrame:
    """What the perturbation did to the perturbed tiles, as the pipeline measured it (after uint8
    rounding and re-embedding): ``tile_cosine_distance``, the mean over slides of their 1 − cos
    feature distance (the label-free objective); ``tile_linf``, the largest pixel change of any
    stored tile, and ``tile_rms``, the mean over slides of their mean RMS change (pixel units in
    [0, 1], like eps; how far an attack in another space, e.g. stain, moved the pixels).

    Rows shaped like ``summarize_attack``'s; clean is 0 by definition, no CI.
    """
    reductions = {"tile_cosine_distance": "mean", "tile_linf": "max", "tile_rms": "mean"}
    rows = []
    for metric, reduce in reductions.items():
        if metric not in eval_df.columns:  # evaluations written before the pixel changes were kept
            continue
        value = float(eval_df[metric].agg(reduce))
        rows.append(
            {
                "metric": metric,
                "clean": 0.0,
                "attacked": value,
                "drop": -value,
                "drop_ci_low": np.nan,
                "drop_ci_high": np.nan,
                "n_slides": len(eval_df),
            }
        )
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
