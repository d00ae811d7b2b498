"""Rule reembed: embed only the k adversarial tiles of one slide."""
from wsiattack import extraction, rulekit, runtime
from wsiattack.encoders.model import build_encoder


def main(smk, spec):
    extraction.reembed_slide(slide_id=smk.wildcards.slide, attack_store=smk.input.attack, encoder=build_encoder(**spec["encoder"]), batch_size=spec["batch_size"], device=runtime.resolve_device(smk.params.device), out_store=smk.output.features)


rulekit.run(snakemake, main)  # noqa: F821
