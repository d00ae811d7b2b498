"""Rule split: stratified (patient-level where possible) k-fold splits, saved for every MIL head."""

from pathlib import Path

from wsiattack import rulekit, stores
from wsiattack.mil import make_splits
from wsiattack.samples import read_samples


def main(smk, spec):
    sheet = read_samples(smk.input.samples, classes=spec["classes"], base_dir=Path(smk.input.samples).parent)
    splits = make_splits(sheet.reset_index(drop=True), folds=spec["folds"], seed=spec["seed"])
    with stores.atomic_file(smk.output.splits) as tmp:
        splits.to_csv(tmp, index=False)


rulekit.run(snakemake, main)  # noqa: F821
