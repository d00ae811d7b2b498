"""Rule evaluate: clean vs. attacked predictions for every test slide of every fold."""
from wsiattack import evaluation, rulekit, stores


def main(smk, spec):
    table = evaluation.evaluate_attack(splits_csv=smk.input.splits, model_paths=smk.input.models, feature_stores=stores.slide_stores(smk.input.features), reembedded_stores=stores.slide_stores(smk.input.reembedded), classes=spec["classes"])
    with stores.atomic_file(smk.output.per_slide) as tmp:
        table.to_csv(tmp, index=False)  # full precision: probabilities must still sum to 1


rulekit.run(snakemake, main)  # noqa: F821
