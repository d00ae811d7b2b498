"""Rule plot_heatmaps: the MIL head's tile weights before and after the attack on the most affected slides."""

from wsiattack import plots, rulekit


def main(smk, spec):
    plots.plot_heatmaps(tile_weights_store=smk.input.tile_weights, tile_dirs=smk.input.tiles, out_png=smk.output.plot)


rulekit.run(snakemake, main)  # noqa: F821
