"""Rule plot_backdoor_trigger: one triggered test tile next to its clean tile, and the learned noise."""

from wsiattack import plots, rulekit


def main(smk, spec):
    plots.plot_backdoor_trigger(smk.input.store, smk.output.plot)


rulekit.run(snakemake, main)  # noqa: F821
