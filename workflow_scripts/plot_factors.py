"""Rule plot_factors: accuracy drop and flip rate against eps and budget, per MIL head."""

import pandas as pd
from wsiattack import plots, rulekit


def main(smk, spec):
    plots.plot_factors(pd.read_csv(smk.input.summary), spec["attacks"], smk.output.plot)


rulekit.run(snakemake, main)  # noqa: F821
