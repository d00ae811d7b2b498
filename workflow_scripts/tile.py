"""Rule tile: the slides of one shard -> one tiles store (coordinates) and QC thumbnail per slide."""

from wsiattack import rulekit, tiling


def main(smk, spec):
    slides = [
        (slide, path, spec["mpp_override"].get(slide))
        for slide, path in zip(spec["slides"], smk.input.slides, strict=True)
    ]
    tiling.tile_shard(
        slides=slides, spec=spec["tiling"], out_dir=smk.output.tiles, out_qc_dir=smk.output.qc, threads=smk.threads
    )


rulekit.run(snakemake, main)  # noqa: F821
