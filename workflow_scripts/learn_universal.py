"""Rule learn_universal: one universal perturbation of one (attack, encoder, fold), learned on the
tiles of the fold's training slides."""

from wsiattack import rulekit, runtime, shardjobs
from wsiattack.attacks.universal import learn_universal
from wsiattack.encoders.model import build_encoder


def main(smk, spec):
    slides = [s for tiles_dir in smk.input.tiles for s in shardjobs.slides_in(tiles_dir, tiling_spec=spec["tiling"])]
    learn_universal(
        tile_stores=[s.tiles_store for s in slides],
        splits_csv=smk.input.splits,
        fold=int(smk.wildcards.fold),
        encoder=build_encoder(**spec["encoder"]),
        spec=spec["attack"],
        device=runtime.resolve_device(smk.params.device),
        out_store=smk.output.pattern,
    )


rulekit.run(snakemake, main)  # noqa: F821
