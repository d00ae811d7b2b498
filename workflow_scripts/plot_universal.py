"""Rule plot_universal: an attack's universal patterns (one per fold) and their training curves."""

from wsiattack import plots, rulekit


def main(smk, spec):
    plots.plot_universal(smk.input.patterns, smk.output.plot)


rulekit.run(snakemake, main)  # noqa: F821
