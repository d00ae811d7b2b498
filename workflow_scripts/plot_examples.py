"""Rule plot_examples: clean / adversarial tiles and their amplified difference."""
from wsiattack import plots, rulekit


def main(smk, spec):
    plots.plot_examples(tile_stores=smk.input.tiles, attack_stores=smk.input.attacks, out_png=smk.output.plot)


rulekit.run(snakemake, main)  # noqa: F821
