"""Rule demo_cohort: synthesise the demo slides and their sample sheet."""

from pathlib import Path

from wsiattack import rulekit, synthetic


def main(smk, spec):
    synthetic.write_demo_cohort(
        slides_dir=Path(smk.output.slides),
        samples_csv=Path(smk.output.samples),
        masks_dir=Path(smk.output.masks),
        classes=spec["classes"],
        workers=smk.threads,
        **spec["demo"],
    )


rulekit.run(snakemake, main)  # noqa: F821 (injected by Snakemake)
