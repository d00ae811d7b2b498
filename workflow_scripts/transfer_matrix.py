"""Rule transfer_matrix: the surrogate x target table with its controls, and its heatmaps."""

import pandas as pd
from wsiattack import rulekit, stores, transfertable


def main(smk, spec):
    matrix = transfertable.transfer_matrix(
        pd.read_csv(smk.input.summary), transfer=spec["transfer"], attacks=spec["attacks"]
    )
    with stores.atomic_file(smk.output.table) as tmp:
        matrix.to_csv(tmp, index=False, float_format="%.6g")
    with stores.atomic_file(smk.output.plot) as tmp:
        transfertable.plot_transfer(matrix, tmp)


rulekit.run(snakemake, main)  # noqa: F821
