"""Rule train_mil: one MIL head on the clean features of one fold's training slides."""

from wsiattack import rulekit, runtime, stores
from wsiattack.mil.folds import train_fold


def main(smk, spec):
    train_fold(
        splits_csv=smk.input.splits,
        feature_stores=stores.slide_stores(smk.input.features),
        spec=spec,
        out_model=smk.output.model,
        device=runtime.resolve_device(smk.params.device),
    )


rulekit.run(snakemake, main)  # noqa: F821
