"""Rule extract: tiles store -> clean features store."""
from wsiattack import extraction, rulekit, runtime, stores, tiling
from wsiattack.encoders.model import build_encoder


def main(smk, spec):
    stores.open_tiles(smk.input.tiles, expected=tiling.expected_tiles_attrs(spec["tiling"]))  # refuse stale tiles
    extraction.extract_slide(slide_id=smk.wildcards.slide, tiles_store=smk.input.tiles, encoder=build_encoder(**spec["encoder"]), batch_size=spec["batch_size"], device=runtime.resolve_device(smk.params.device), out_store=smk.output.features)


rulekit.run(snakemake, main)  # noqa: F821
