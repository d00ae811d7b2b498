"""The backdoor table: clean accuracy (CA) and backdoor accuracy (BA) of every back-doored head.

One row per (encoder, MIL model, shots, trigger, target) from the backdoor jobs' per-slide CSVs
(``backdoor.run_backdoor``), every test slide of every fold counted once:

- CA: the share of test slides the head classifies right without the trigger, with its exact
  (Clopper–Pearson) 95 % interval and its change from the clean head of the same shots setting;
  AUROC from the clean probabilities;
- BA: the share of triggered test slides predicted as the target, on all test slides and on
  those whose true class is not the target (the slides the trigger has to move), each with its
  exact interval.

The clean head (trigger ``clean``: nothing poisoned, tested with the patch alone) gives each
target the rate at which the trigger alone moves an honest head. A row with target ``mean``
averages each trigger's rows over the targets (BAPLe's reporting; no interval, as the targets
share the slides).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from wsiattack.metrics import classification_metrics, clopper_pearson
from wsiattack.names import BACKDOOR_CLEAN_HEAD

MEAN_TARGET = "mean"
KEYS = ("encoder", "mil", "shots", "trigger", "target")
RATES = ("clean_accuracy", "clean_accuracy_change", "backdoor_accuracy", "backdoor_accuracy_non_target")
COLUMNS = (
    *KEYS,
    "n_slides",
    "clean_accuracy",
    "clean_accuracy_ci_low",
    "clean_accuracy_ci_high",
    "clean_accuracy_change",
    "clean_auroc",
    "backdoor_accuracy",
    "backdoor_accuracy_ci_low",
    "backdoor_accuracy_ci_high",
    "backdoor_accuracy_non_target",
    "backdoor_accuracy_non_target_ci_low",
    "backdoor_accuracy_non_target_ci_high",
    "n_non_target",
    "n_poisoned",
)


def backdoor_table(per_slide: pd.DataFrame, *, classes: Sequence[str], targets: Sequence[str]) -> pd.DataFrame:
    """The CA/BA table (``COLUMNS``) of the concatenated per-slide CSVs of every backdoor job."""
    per_slide = per_slide.astype({"shots": str, "target": str}).fillna({"target": ""})
    rows = []
    for (encoder, mil, shots), group in per_slide.groupby(["encoder", "mil", "shots"], sort=False):
        clean_head = group[group["trigger"] == BACKDOOR_CLEAN_HEAD]
        clean_accuracy = _accuracy(clean_head) if len(clean_head) else np.nan
        for trigger in dict.fromkeys(group["trigger"]):
            ours = group[group["trigger"] == trigger]
            block = [
                {
                    "encoder": encoder,
                    "mil": mil,
                    "shots": shots,
                    "trigger": trigger,
                    "target": target,
                    **_rates(
                        ours if trigger == BACKDOOR_CLEAN_HEAD else ours[ours["target"] == target],
                        target=target,
                        classes=classes,
                        clean_accuracy=clean_accuracy,
                    ),
                }
                for target in targets
                if trigger == BACKDOOR_CLEAN_HEAD or (ours["target"] == target).any()
            ]
            rows += block
            if len(block) > 1:
                mean = {key: block[0][key] for key in KEYS[:4]}
                rows.append({**mean, "target": MEAN_TARGET, **{r: np.mean([b[r] for b in block]) for r in RATES}})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _accuracy(rows: pd.DataFrame) -> float:
    return float((rows["clean_pred"].astype(str) == rows["label"].astype(str)).mean())


def _rates(rows: pd.DataFrame, *, target: str, classes: Sequence[str], clean_accuracy: float) -> dict[str, float]:
    labels = rows["label"].astype(str)
    correct = int((rows["clean_pred"].astype(str) == labels).sum())
    hits = rows["triggered_pred"].astype(str) == target
    others = labels != target
    y_true = np.array([list(classes).index(label) for label in labels])
    prob = rows[[f"clean_prob_{name}" for name in classes]].to_numpy(dtype=float)
    auroc = classification_metrics(y_true=y_true, prob=prob, y_pred=prob.argmax(axis=1), n_classes=len(classes))
    n, n_others = len(rows), int(others.sum())
    ca_low, ca_high = clopper_pearson(correct, n)
    ba_low, ba_high = clopper_pearson(int(hits.sum()), n)
    nt_low, nt_high = clopper_pearson(int(hits[others].sum()), n_others) if n_others else (np.nan, np.nan)
    return {
        "n_slides": n,
        "clean_accuracy": correct / n,
        "clean_accuracy_ci_low": ca_low,
        "clean_accuracy_ci_high": ca_high,
        "clean_accuracy_change": correct / n - clean_accuracy,
        "clean_auroc": auroc["auroc"],
        "backdoor_accuracy": float(hits.mean()),
        "backdoor_accuracy_ci_low": ba_low,
        "backdoor_accuracy_ci_high": ba_high,
        "backdoor_accuracy_non_target": float(hits[others].mean()) if n_others else np.nan,
        "backdoor_accuracy_non_target_ci_low": nt_low,
        "backdoor_accuracy_non_target_ci_high": nt_high,
        "n_non_target": n_others,
        "n_poisoned": int(rows.groupby("fold")["fold_poisoned"].first().sum()),
    }
