"""Rule plot_examples: clean / adversarial tiles and their amplified difference."""

from wsiattack import plots, rulekit, stores


def main(smk, spec):
    slides = smk.params.slides
    plots.plot_examples(
        tile_stores=[stores.find_slide_store(smk.input.tiles, s) for s in slides],
        attack_stores=[stores.find_slide_store(smk.input.attacks, s) for s in slides],
        out_png=smk.output.plot,
    )


rulekit.run(snakemake, main)  # noqa: F821
