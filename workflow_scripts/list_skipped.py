"""Rule list_skipped: the slides left out for lack of tissue (tiling.skip_empty), as a CSV."""

import csv

from wsiattack import rulekit, stores


def main(smk, spec):
    rows = stores.skipped_slides(stores.slide_stores(smk.input.tiles))
    with stores.atomic_file(smk.output.skipped) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["slide_id", "reason"])
        writer.writeheader()
        writer.writerows(rows)


rulekit.run(snakemake, main)  # noqa: F821
