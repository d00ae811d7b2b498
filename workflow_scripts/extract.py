"""Rule extract: the tiles stores of one shard -> one features store per slide."""

from wsiattack import rulekit, runtime, shardjobs
from wsiattack.defences.pipeline import encoder_for


def main(smk, spec):
    slides = shardjobs.slides_in(smk.input.tiles, tiling_spec=spec["tiling"])
    shardjobs.extract_shard(
        slides=slides,
        encoder=encoder_for(spec),
        batch_size=spec["batch_size"],
        device=runtime.resolve_device(smk.params.device),
        out_dir=smk.output.features,
        reader_threads=smk.threads,
    )


rulekit.run(snakemake, main)  # noqa: F821
