"""Rule reembed: a derived attack's stored tiles of one shard (perturbed on a surrogate, or
shuffled) re-embedded by one encoder."""

from wsiattack import rulekit, runtime, shardjobs
from wsiattack.defences.pipeline import encoder_for


def main(smk, spec):
    shardjobs.reembed_shard(
        attacks_dir=smk.input.attacks,
        encoder=encoder_for(spec),
        batch_size=spec["batch_size"],
        device=runtime.resolve_device(smk.params.device),
        out_reembedded=smk.output.reembedded,
    )


rulekit.run(snakemake, main)  # noqa: F821
