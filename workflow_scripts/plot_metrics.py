"""Rule plot_metrics: bar plot of clean vs. attacked metrics."""

import pandas as pd
from wsiattack import plots, rulekit


def main(smk, spec):
    plots.plot_metrics(pd.read_csv(smk.input.summary), smk.output.plot)


rulekit.run(snakemake, main)  # noqa: F821
