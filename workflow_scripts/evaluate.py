"""Rule evaluate: clean vs. attacked predictions for every test slide of every fold, and the
head's tile weights on the most affected slides (for the heatmaps)."""

from wsiattack import evaluation, rulekit, stores


def main(smk, spec):
    table = evaluation.evaluate_attack(
        splits_csv=smk.input.splits,
        model_paths=smk.input.models,
        feature_stores=stores.slide_stores(smk.input.features),
        reembedded_stores=stores.slide_stores(smk.input.reembedded),
        classes=spec["classes"],
        defence=spec.get("defence"),
    )
    evaluation.write_most_affected_weights(
        table=table,
        model_paths=smk.input.models,
        feature_dirs=smk.input.features,
        reembedded_dirs=smk.input.reembedded,
        classes=spec["classes"],
        n_slides=spec["n_heatmap_slides"],
        out_store=smk.output.tile_weights,
    )
    with stores.atomic_file(smk.output.per_slide) as tmp:
        table.to_csv(tmp, index=False)  # full precision: probabilities must still sum to 1


rulekit.run(snakemake, main)  # noqa: F821
