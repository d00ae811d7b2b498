"""Rules attack and perturb_surrogate: perturb the selected tiles of every slide of one shard,
then (rule attack) re-embed them; a transfer attack's surrogate job only perturbs."""

from wsiattack import rulekit, runtime, shardjobs
from wsiattack.attacks.oracle import load_fold_head
from wsiattack.attacks.params import uses_mil_head
from wsiattack.encoders.model import build_encoder


def main(smk, spec):
    slides = shardjobs.slides_in(smk.input.tiles, tiling_spec=spec["tiling"])
    # gray-box attacks: the head of the fold in which the slide is a test slide
    mil_head_of = (
        (
            lambda slide_id: load_fold_head(
                slide_id=slide_id, splits_csv=smk.input.splits, model_paths=smk.input.mil_heads
            )
        )
        if uses_mil_head(spec["attack"])
        else None
    )
    shardjobs.attack_shard(
        slides=slides,
        encoder=build_encoder(**spec["encoder"]),
        spec=spec["attack"],
        batch_size=spec["batch_size"],
        device=runtime.resolve_device(smk.params.device),
        out_attacks=smk.output.attacks,
        out_reembedded=dict(smk.output.items()).get("reembedded"),
        features_dir=smk.input.features or None,
        mil_head_of=mil_head_of,
        reader_threads=smk.threads,
    )


rulekit.run(snakemake, main)  # noqa: F821
