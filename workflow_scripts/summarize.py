"""Rule summarize: every per-slide evaluation -> one tidy results/summary.csv."""

from pathlib import Path

import pandas as pd
from wsiattack import metrics, rulekit, stores
from wsiattack.errors import StoreError
from wsiattack.evaluation import MARKING_COLUMNS


def main(smk, spec):
    splits = pd.read_csv(smk.input.splits, dtype={"slide_id": str, "patient_id": str})
    patients = dict(zip(splits["slide_id"], splits["patient_id"], strict=True))  # CIs resample patients
    parts = []
    for path in smk.input.evaluations:
        encoder, mil, attack = Path(path).parts[-3], Path(path).parts[-2], Path(path).stem
        evaluation = pd.read_csv(path, dtype={"slide_id": str})
        table = metrics.summarize_attack(
            evaluation, classes=spec["classes"], n_bootstrap=spec["n_bootstrap"], seed=spec["seed"], patients=patients
        )
        table = pd.concat([table, metrics.embedding_shift(evaluation)], ignore_index=True)
        parts.append(table.assign(encoder=encoder, mil=mil, attack=attack, **marking(evaluation, path=path)))
    summary = pd.concat(parts, ignore_index=True)
    first = ["encoder", "mil", "attack", "metric", "clean", "attacked", "drop"]
    summary = summary[first + [c for c in summary.columns if c not in first]]
    with stores.atomic_file(smk.output.summary) as tmp:
        summary.to_csv(tmp, index=False, float_format="%.6g")


def marking(evaluation: pd.DataFrame, *, path: str) -> dict:
    """The attack's label_free / threat_model, one value per per-slide CSV."""
    missing = [c for c in MARKING_COLUMNS if c not in evaluation.columns]
    if missing:
        raise StoreError(
            f"{path}: no {', '.join(missing)} column (written before attacks were marked); delete it so that evaluate re-runs"
        )
    values = evaluation[list(MARKING_COLUMNS)].drop_duplicates()
    if len(values) != 1:
        raise StoreError(
            f"{path}: slides disagree on {', '.join(MARKING_COLUMNS)}: stores of different attack specs; re-run the attack"
        )
    return values.iloc[0].to_dict()


rulekit.run(snakemake, main)  # noqa: F821
