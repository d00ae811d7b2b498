"""Rules backdoor and backdoor_clean_head: one MIL head per fold trained with the job's poisoned
training slides (or none), every test slide evaluated clean and triggered."""

from wsiattack import rulekit, runtime, shardjobs, stores
from wsiattack.backdoor import run_backdoor
from wsiattack.encoders.model import build_encoder


def main(smk, spec):
    slides = [s for tiles_dir in smk.input.tiles for s in shardjobs.slides_in(tiles_dir, tiling_spec=spec["tiling"])]
    run_backdoor(
        splits_csv=smk.input.splits,
        feature_stores=stores.slide_stores(smk.input.features),
        tile_stores=[s.tiles_store for s in slides],
        encoder=build_encoder(**spec["encoder"]),
        spec=spec,
        device=runtime.resolve_device(smk.params.device),
        batch_size=spec["batch_size"],
        out_csv=smk.output.per_slide,
        out_store=smk.output.store,
    )


rulekit.run(snakemake, main)  # noqa: F821
