"""Rule summarize: every per-slide evaluation -> one tidy results/summary.csv."""
from pathlib import Path

import pandas as pd

from wsiattack import metrics, rulekit, stores


def main(smk, spec):
    parts = []
    for path in smk.input.evaluations:
        encoder, mil, attack = Path(path).parts[-3], Path(path).parts[-2], Path(path).stem
        evaluation = pd.read_csv(path, dtype={"slide_id": str})
        table = metrics.summarize_attack(evaluation, classes=spec["classes"], n_bootstrap=spec["n_bootstrap"], seed=spec["seed"])
        table = pd.concat([table, metrics.embedding_shift(evaluation)], ignore_index=True)
        parts.append(table.assign(encoder=encoder, mil=mil, attack=attack))
    summary = pd.concat(parts, ignore_index=True)
    first = ["encoder", "mil", "attack", "metric", "clean", "attacked", "drop"]
    summary = summary[first + [c for c in summary.columns if c not in first]]
    with stores.atomic_file(smk.output.summary) as tmp:
        summary.to_csv(tmp, index=False, float_format="%.6g")


rulekit.run(snakemake, main)  # noqa: F821
