"""Rule backdoor_table: the CA/BA table of every backdoor job and its plot."""

import pandas as pd
from wsiattack import backdoortable, plots, rulekit, stores


def main(smk, spec):
    per_slide = pd.concat([pd.read_csv(path, dtype={"slide_id": str}) for path in smk.input.per_slide])
    table = backdoortable.backdoor_table(per_slide, classes=spec["classes"], targets=spec["targets"])
    with stores.atomic_file(smk.output.table) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    plots.plot_backdoor(table, smk.output.plot)


rulekit.run(snakemake, main)  # noqa: F821
