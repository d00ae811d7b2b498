"""Rule perturb: attack the selected tiles of one slide -> attack store (uint8 adversarial tiles)."""
from wsiattack import rulekit, runtime, stores, tiling
from wsiattack.attacks.oracle import load_fold_head
from wsiattack.attacks.params import uses_mil_head
from wsiattack.attacks.perturb import perturb_slide
from wsiattack.encoders.model import build_encoder


def main(smk, spec):
    stores.open_tiles(smk.input.tiles, expected=tiling.expected_tiles_attrs(spec["tiling"]))  # refuse stale tiles
    slide = smk.wildcards.slide
    # gray-box attacks: the head of the fold in which this slide is a test slide
    mil_head = load_fold_head(slide_id=slide, splits_csv=smk.input.splits, model_paths=smk.input.mil_heads) if uses_mil_head(spec["attack"]) else None
    perturb_slide(slide_id=slide, tiles_store=smk.input.tiles, encoder=build_encoder(**spec["encoder"]), spec=spec["attack"], device=runtime.resolve_device(smk.params.device), out_store=smk.output.attack, features_store=smk.input.features or None, mil_head=mil_head)


rulekit.run(snakemake, main)  # noqa: F821
