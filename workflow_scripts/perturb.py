"""Rule perturb: attack the selected tiles of one slide -> attack store (uint8 adversarial tiles)."""
from wsiattack import rulekit, runtime, stores, tiling
from wsiattack.attacks.perturb import perturb_slide
from wsiattack.encoders.model import build_encoder


def main(smk, spec):
    stores.open_tiles(smk.input.tiles, expected=tiling.expected_tiles_attrs(spec["tiling"]))  # refuse stale tiles
    perturb_slide(slide_id=smk.wildcards.slide, tiles_store=smk.input.tiles, encoder=build_encoder(**spec["encoder"]), spec=spec["attack"], device=runtime.resolve_device(smk.params.device), out_store=smk.output.attack, features_store=smk.input.features or None)


rulekit.run(snakemake, main)  # noqa: F821
