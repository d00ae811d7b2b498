"""Classification metrics and the clean-vs-attacked summary."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from wsiattack.metrics import classification_metrics, summarize_attack

CLASSES = ["normal", "tumor"]
METRICS = ["accuracy", "balanced_accuracy", "f1_macro", "auroc", "flip_rate"]
COLUMNS = ["metric", "clean", "attacked", "drop", "drop_ci_low", "drop_ci_high", "n_slides"]


def _binary_prob(p_tumor: list[float]) -> np.ndarray:
    p_tumor = np.asarray(p_tumor)
    return np.stack([1 - p_tumor, p_tumor], axis=1)


# --- classification_metrics ---------------------------------------------------------------------


def test_classification_metrics_by_hand() -> None:
    metrics = classification_metrics(
        y_true=np.array([0, 0, 1, 1]),
        y_pred=np.array([0, 1, 1, 1]),
        prob=_binary_prob([0.1, 0.75, 0.7, 0.8]),
        n_classes=2,
    )
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)  # recalls 1/2 and 1
    assert metrics["f1_macro"] == pytest.approx((2 / 3 + 4 / 5) / 2)  # F1 = 2PR/(P+R) per class
    assert metrics["auroc"] == pytest.approx(3 / 4)  # 3 of 4 (positive, negative) pairs ranked right


def test_classification_metrics_auroc_is_nan_with_one_class() -> None:
    metrics = classification_metrics(
        y_true=np.array([1, 1, 1]), y_pred=np.array([1, 0, 1]), prob=_binary_prob([0.9, 0.2, 0.6]), n_classes=2
    )
    assert math.isnan(metrics["auroc"])
    assert metrics["accuracy"] == pytest.approx(2 / 3)


def test_classification_metrics_multiclass_auroc_is_macro_one_vs_rest() -> None:
    rng = np.random.default_rng(0)
    y_true = np.repeat([0, 1, 2], 5)
    prob = rng.dirichlet(np.ones(3), size=15)
    metrics = classification_metrics(y_true=y_true, prob=prob, y_pred=prob.argmax(axis=1), n_classes=3)
    one_vs_rest = [roc_auc_score(y_true == c, prob[:, c]) for c in range(3)]
    assert metrics["auroc"] == pytest.approx(np.mean(one_vs_rest))
    missing_class = classification_metrics(y_true=y_true[:10], prob=prob[:10], y_pred=y_true[:10], n_classes=3)
    assert math.isnan(missing_class["auroc"])


def test_classification_metrics_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="prob"):
        classification_metrics(y_true=np.array([0, 1]), y_pred=np.array([0, 1]), prob=np.ones((2, 3)), n_classes=2)


# --- summarize_attack ---------------------------------------------------------------------------


def _eval_table(*, label_idx, clean_pred, attacked_pred, clean_p_tumor, attacked_p_tumor) -> pd.DataFrame:
    n = len(label_idx)
    return pd.DataFrame(
        {
            "slide_id": [f"s{i}" for i in range(n)],
            "fold": [i % 2 for i in range(n)],
            "label": [CLASSES[i] for i in label_idx],
            "label_idx": label_idx,
            "clean_pred": clean_pred,
            "attacked_pred": attacked_pred,
            "clean_prob_normal": 1 - np.asarray(clean_p_tumor),
            "clean_prob_tumor": clean_p_tumor,
            "attacked_prob_normal": 1 - np.asarray(attacked_p_tumor),
            "attacked_prob_tumor": attacked_p_tumor,
            # columns the summary must ignore
            "k": 4,
            "n_tiles": 100,
            "clean_attention_on_attacked": 0.1,
        }
    )


@pytest.fixture
def eval_df() -> pd.DataFrame:
    # clean: 9/10 right; attacked: 5/10 right; slides 0, 1, 5, 6 flip (4/10).
    return _eval_table(
        label_idx=[0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
        clean_pred=[0, 0, 0, 0, 1, 1, 1, 1, 1, 1],
        attacked_pred=[1, 1, 0, 0, 1, 0, 0, 1, 1, 1],
        clean_p_tumor=[0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.85],
        attacked_p_tumor=[0.6, 0.7, 0.3, 0.4, 0.8, 0.2, 0.1, 0.9, 0.55, 0.65],
    )


def test_summarize_attack_exact_values_and_drop_sign(eval_df: pd.DataFrame) -> None:
    summary = summarize_attack(eval_df, classes=CLASSES, n_bootstrap=300, seed=0).set_index("metric")
    assert summary.reset_index().columns.tolist() == COLUMNS
    assert summary.index.tolist() == METRICS
    assert (summary["n_slides"] == 10).all()
    assert summary.loc["accuracy", ["clean", "attacked", "drop"]].tolist() == pytest.approx([0.9, 0.5, 0.4])
    assert summary.loc["balanced_accuracy", ["clean", "attacked"]].tolist() == pytest.approx([0.9, 0.5])
    assert summary.loc["flip_rate", ["clean", "attacked", "drop"]].tolist() == pytest.approx([0.0, 0.4, -0.4])
    assert summary.loc["auroc", "drop"] > 0
    assert (summary["drop_ci_low"] <= summary["drop"]).all()
    assert (summary["drop"] <= summary["drop_ci_high"]).all()


def test_summarize_attack_is_deterministic(eval_df: pd.DataFrame) -> None:
    first = summarize_attack(eval_df, classes=CLASSES, n_bootstrap=100, seed=3)
    pd.testing.assert_frame_equal(first, summarize_attack(eval_df, classes=CLASSES, n_bootstrap=100, seed=3))
    other_seed = summarize_attack(eval_df, classes=CLASSES, n_bootstrap=100, seed=4)
    assert not first["drop_ci_low"].equals(other_seed["drop_ci_low"])


def test_summarize_attack_without_bootstrap_has_nan_cis(eval_df: pd.DataFrame) -> None:
    summary = summarize_attack(eval_df, classes=CLASSES, n_bootstrap=0, seed=0)
    bootstrapped = summary[summary["metric"] != "flip_rate"]  # the flip rate's interval is exact
    assert bootstrapped[["drop_ci_low", "drop_ci_high"]].isna().all().all()
    with_bootstrap = summarize_attack(eval_df, classes=CLASSES, n_bootstrap=20, seed=0)
    pd.testing.assert_frame_equal(summary[COLUMNS[:4]], with_bootstrap[COLUMNS[:4]])


def test_summarize_attack_skips_undefined_resamples(eval_df: pd.DataFrame) -> None:
    # Two tumor slides among ten: some resamples lack tumor, AUROC is then skipped, not NaN overall.
    rare = eval_df.assign(label_idx=[0] * 8 + [1] * 2, label=["normal"] * 8 + ["tumor"] * 2)
    summary = summarize_attack(rare, classes=CLASSES, n_bootstrap=200, seed=0).set_index("metric")
    assert summary[["drop_ci_low", "drop_ci_high"]].notna().all().all()
    only_normal = eval_df.assign(label_idx=0, label="normal")
    summary = summarize_attack(only_normal, classes=CLASSES, n_bootstrap=50, seed=0).set_index("metric")
    assert summary.loc["auroc", ["clean", "attacked", "drop", "drop_ci_low", "drop_ci_high"]].isna().all()
    assert summary.drop(index="auroc")[["drop_ci_low", "drop_ci_high"]].notna().all().all()


def test_summarize_attack_multiclass() -> None:
    classes = ["a", "b", "c"]
    rng = np.random.default_rng(1)
    label_idx = np.repeat([0, 1, 2], 8)
    clean_prob = rng.dirichlet(np.ones(3), size=24) + 2 * np.eye(3)[label_idx]  # mostly right
    clean_prob /= clean_prob.sum(axis=1, keepdims=True)
    attacked_prob = rng.dirichlet(np.ones(3), size=24)
    table = pd.DataFrame({"slide_id": [f"s{i}" for i in range(24)], "label": np.asarray(classes)[label_idx]})
    table = table.assign(
        label_idx=label_idx, clean_pred=clean_prob.argmax(axis=1), attacked_pred=attacked_prob.argmax(axis=1)
    )
    for c, name in enumerate(classes):
        table[f"clean_prob_{name}"] = clean_prob[:, c]
        table[f"attacked_prob_{name}"] = attacked_prob[:, c]

    summary = summarize_attack(table, classes=classes, n_bootstrap=100, seed=0).set_index("metric")
    assert summary.loc["accuracy", "clean"] == pytest.approx(np.mean(table["clean_pred"] == label_idx))
    assert summary.loc["accuracy", "attacked"] == pytest.approx(np.mean(table["attacked_pred"] == label_idx))
    flip_rate = np.mean(table["clean_pred"] != table["attacked_pred"])
    assert summary.loc["flip_rate", "attacked"] == pytest.approx(flip_rate)
    assert summary.notna().all().all()
    assert (summary["drop_ci_low"] <= summary["drop_ci_high"]).all()


def test_summarize_attack_rejects_classes_in_another_order(eval_df: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match=r"classes\[label_idx\]"):
        summarize_attack(eval_df, classes=["tumor", "normal"], n_bootstrap=0, seed=0)


def test_summarize_attack_rejects_missing_columns(eval_df: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="attacked_prob_tumor"):
        summarize_attack(eval_df.drop(columns="attacked_prob_tumor"), classes=CLASSES, n_bootstrap=0, seed=0)


@pytest.mark.parametrize(("n_classes", "n_slides"), [(2, 20), (2, 6), (3, 30)])
def test_vectorised_bootstrap_equals_sklearn_on_every_resample(n_classes: int, n_slides: int) -> None:
    """Each resample's drops, computed from slide counts, are sklearn's metrics of the resampled
    table (same draws, same seed), NaN where a class is missing; ties in the scores included."""
    from wsiattack.metrics import _bootstrap_drops, _PairedPredictions

    rng = np.random.default_rng(n_classes * 100 + n_slides)
    y_true = rng.integers(0, n_classes, n_slides)

    def probabilities() -> np.ndarray:
        p = np.round(rng.random((n_slides, n_classes)), 1) + 1e-3  # rounded: tied scores
        return p / p.sum(axis=1, keepdims=True)

    clean, attacked = probabilities(), probabilities()
    paired = _PairedPredictions(
        y_true=y_true,
        clean_prob=clean,
        attacked_prob=attacked,
        clean_pred=clean.argmax(1),
        attacked_pred=attacked.argmax(1),
    )
    draws = np.random.default_rng(7).integers(0, n_slides, size=(200, n_slides))
    expected = []
    for rows in draws:
        before, after = paired.subset(rows).clean_and_attacked(n_classes=n_classes)
        expected.append(before - after)
    got = _bootstrap_drops(paired, n_classes=n_classes, n_bootstrap=200, seed=7)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(expected), rtol=0, atol=1e-12)
    assert np.isnan(expected).any() == (n_slides == 6)  # the small cohort has resamples without a class


def test_flip_rate_interval_is_exact_clopper_pearson(eval_df: pd.DataFrame) -> None:
    from scipy.stats import binomtest

    summary = summarize_attack(eval_df, classes=CLASSES, n_bootstrap=50, seed=0).set_index("metric")
    exact = binomtest(4, 10).proportion_ci(confidence_level=0.95, method="exact")  # 4 of 10 flipped
    assert summary.loc["flip_rate", ["drop_ci_low", "drop_ci_high"]].tolist() == pytest.approx(
        [-exact.high, -exact.low]
    )
    unmoved = eval_df.assign(
        **{c: eval_df[c.replace("attacked", "clean")] for c in eval_df.columns if c.startswith("attacked")}
    )
    none = summarize_attack(unmoved, classes=CLASSES, n_bootstrap=50, seed=0).set_index("metric").loc["flip_rate"]
    # 0 of 10 flipped: the interval still admits a flip rate of up to 30.8 %, not [0, 0]
    assert (
        none["drop"] == 0
        and none["drop_ci_high"] == 0
        and none["drop_ci_low"] == pytest.approx(-(1 - 0.025 ** (1 / 10)))
    )
    from wsiattack.metrics import clopper_pearson

    assert (
        clopper_pearson(0, 20)[1] == pytest.approx(1 - 0.025 ** (1 / 20)) and clopper_pearson(0, 20)[1] >= 0.15
    )  # 0.168


def test_bootstrap_resamples_patients_with_all_their_slides(eval_df: pd.DataFrame) -> None:
    from wsiattack.metrics import _bootstrap_drops, _paired_predictions, _patient_groups

    own = {s: s for s in eval_df["slide_id"]}
    pd.testing.assert_frame_equal(  # one slide per patient: the slide bootstrap, draw for draw
        summarize_attack(eval_df, classes=CLASSES, n_bootstrap=100, seed=2, patients=own),
        summarize_attack(eval_df, classes=CLASSES, n_bootstrap=100, seed=2),
    )
    pairs = {s: f"p{i // 2}" for i, s in enumerate(eval_df["slide_id"])}  # 5 patients of 2 slides
    groups = _patient_groups(eval_df["slide_id"], pairs)
    paired = _paired_predictions(eval_df, classes=CLASSES)
    got = _bootstrap_drops(paired, n_classes=2, n_bootstrap=50, seed=4, groups=groups)
    draws = np.random.default_rng(4).integers(0, 5, size=(50, 5))
    for drawn, row in zip(draws, got, strict=True):
        rows = np.concatenate([np.flatnonzero(groups == g) for g in drawn])  # each drawn patient's slides
        before, after = paired.subset(rows).clean_and_attacked(n_classes=2)
        np.testing.assert_allclose(np.nan_to_num(row[:4]), np.nan_to_num((before - after)[:4]), atol=1e-12)
    with pytest.raises(ValueError, match="no patient_id for slide"):
        summarize_attack(eval_df, classes=CLASSES, n_bootstrap=10, seed=0, patients={})
