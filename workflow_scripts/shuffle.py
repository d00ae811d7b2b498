"""Rule shuffle: the shuffled-perturbation control of another attack, for every slide of one shard."""

from wsiattack import rulekit, shardjobs


def main(smk, spec):
    shardjobs.shuffle_shard(
        slides=shardjobs.slides_in(smk.input.tiles, tiling_spec=spec["tiling"]),
        spec=spec["attack"],
        source_dir=smk.input.source,
        out_attacks=smk.output.attacks,
    )


rulekit.run(snakemake, main)  # noqa: F821
