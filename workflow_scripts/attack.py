"""Rules attack and perturb_surrogate: perturb the selected tiles of every slide of one shard,
then (rule attack) re-embed them; a transfer attack's surrogate job only perturbs."""

import dataclasses

from wsiattack import rulekit, runtime, shardjobs
from wsiattack.attacks.oracle import load_fold_head
from wsiattack.attacks.params import uses_mil_head
from wsiattack.defences.aggregation import defended_head
from wsiattack.defences.pipeline import encoder_for, pipeline_of


def main(smk, spec):
    slides = shardjobs.slides_in(smk.input.tiles, tiling_spec=spec["tiling"])
    # rule attack_defended: the adaptive attack sees the defence (recorded in the attack spec)
    defence = spec.get("defence")
    attack = {**spec["attack"], "defence": defence} if defence else spec["attack"]

    def mil_head_of(slide_id):  # gray-box attacks: the head of the fold in which the slide is a test slide
        head = load_fold_head(slide_id=slide_id, splits_csv=smk.input.splits, model_paths=smk.input.mil_heads)
        return dataclasses.replace(head, module=defended_head(head.module, defence))

    encoder = encoder_for(spec, attacker=True)
    shardjobs.attack_shard(
        slides=slides,
        encoder=encoder,
        reembed_encoder=pipeline_of(encoder),
        spec=attack,
        batch_size=spec["batch_size"],
        device=runtime.resolve_device(smk.params.device),
        out_attacks=smk.output.attacks,
        out_reembedded=dict(smk.output.items()).get("reembedded"),
        features_dir=smk.input.features or None,
        mil_head_of=mil_head_of if uses_mil_head(attack) else None,
        reader_threads=smk.threads,
    )


rulekit.run(snakemake, main)  # noqa: F821
