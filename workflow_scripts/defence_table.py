"""Rule defence_table: every defended evaluation against the undefended one -> results/defences.csv and its plot."""

from pathlib import Path

import pandas as pd
from wsiattack import defencetable, plots, rulekit, stores


def main(smk, spec):
    splits = pd.read_csv(smk.input.splits, dtype={"slide_id": str, "patient_id": str})
    patients = dict(zip(splits["slide_id"], splits["patient_id"], strict=True))
    read = lambda path: pd.read_csv(path, dtype={"slide_id": str})  # noqa: E731
    undefended = {tuple(Path(p).parts[-3:-1]) + (Path(p).stem,): read(p) for p in smk.input.undefended}
    # results/defences/eval/{encoder}/{mil}/{defence}/{mode}/{attack}.csv
    defended = {tuple(Path(p).parts[-5:-1]) + (Path(p).stem,): read(p) for p in smk.input.defended}
    table = defencetable.defence_table(
        defended,
        undefended,
        defences=spec["defences"],
        classes=spec["classes"],
        n_bootstrap=spec["n_bootstrap"],
        seed=spec["seed"],
        patients=patients,
    )
    with stores.atomic_file(smk.output.table) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    plots.plot_defences(table, smk.output.plot)


rulekit.run(snakemake, main)  # noqa: F821
