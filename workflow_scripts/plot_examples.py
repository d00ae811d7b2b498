"""Rule plot_examples: clean / adversarial tiles and their amplified difference."""
from wsiattack import plots, rulekit, stores


def main(smk, spec):
    attack_stores = [stores.find_slide_store(smk.input.attacks, slide) for slide in smk.params.slides]
    plots.plot_examples(tile_stores=smk.input.tiles, attack_stores=attack_stores, slide_paths=smk.input.slides, out_png=smk.output.plot)


rulekit.run(snakemake, main)  # noqa: F821
