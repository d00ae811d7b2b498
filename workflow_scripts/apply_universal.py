"""Rule apply_universal: every slide of one shard perturbed with the universal pattern of its test fold."""

from wsiattack import rulekit, shardjobs, stores


def main(smk, spec):
    patterns = {stores.open_store(p, kind=stores.UNIVERSAL).attrs["fold"]: p for p in smk.input.patterns}
    shardjobs.universal_shard(
        slides=shardjobs.slides_in(smk.input.tiles, tiling_spec=spec["tiling"]),
        spec=spec["attack"],
        splits_csv=smk.input.splits,
        pattern_of_fold=patterns,
        out_attacks=smk.output.attacks,
    )


rulekit.run(snakemake, main)  # noqa: F821
