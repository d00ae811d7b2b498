"""Rule tile: one slide -> tiles store + QC thumbnail."""
from wsiattack import rulekit, tiling


def main(smk, spec):
    tiling.tile_slide(slide_id=smk.wildcards.slide, slide_path=smk.input.slide, spec=spec["tiling"], mpp_override=spec["mpp_override"], out_store=smk.output.store, out_qc=smk.output.qc, threads=smk.threads)


rulekit.run(snakemake, main)  # noqa: F821
