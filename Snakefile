# Adversarial robustness of pathology foundation models on whole-slide images.
#
#   slides --tile--> tiles (coordinates) --extract--> clean features --train_mil--> MIL heads (k-fold)
#            tiles --attack: perturb k tiles, re-embed them--> adversarial tiles + k new feature rows
#            (transfer: perturb_surrogate on the surrogate, then reembed per target; shuffle: controls;
#             universal: learn_universal per encoder and fold, apply_universal, then reembed)
#   MIL heads + clean/attacked bags --evaluate--> per-slide CSV --summarize--> summary.csv, plots
#   (defences: each defence vs each listed attack, non-adaptive and adaptive --> defences.csv)
#
# Read from here down: rules/common.smk holds the config and sample-sheet handling, then one
# file per stage. The library behind every rule script is workflow_scripts/wsiattack/.
# The GPU rules (extract, attack, perturb_surrogate, reembed) run one job per shard of slides, loading the model
# once; learn_universal (GPU) runs one job per (attack, encoder, fold).
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/tile.smk"
include: "rules/extract.smk"
include: "rules/attack.smk"
include: "rules/mil.smk"
include: "rules/report.smk"
include: "rules/backdoor.smk"
include: "rules/defence.smk"


# Cohort-level steps that read a few small files run where Snakemake runs, not as cluster jobs:
# each would otherwise wait in the queue and start Snakemake twice for seconds of work.
# (No effect on a workstation.)
localrules:
    all,
    demo_cohort,
    split,
    list_skipped,
    summarize,
    plot_metrics,
    plot_factors,
    plot_heatmaps,
    vulnerability,
    plot_examples,
    transfer_matrix,
    plot_universal,
    backdoor_table,
    plot_backdoor_trigger,
    defence_table,


rule all:
    default_target: True
    input:
        "results/summary.csv",
        "results/skipped_slides.csv",
        "results/plots/metrics.png",
        "results/plots/factors.png",
        ["results/transfer.csv", "results/plots/transfer.png"] if "transfer" in CONFIG else [],
        ["results/backdoor.csv", "results/plots/backdoor.png"] if BACKDOOR else [],
        ["results/defences.csv", "results/plots/defences.png"] if DEFENCES else [],
        expand("results/plots/backdoor/{encoder}_trigger.png", encoder=ENCODERS if BACKDOOR else []),
        expand("results/plots/examples/{attack}/{encoder}.png", attack=ATTACKS, encoder=ENCODERS),
        [
            f"results/plots/universal/{attack}/{encoder}.png"
            for attack in PATTERN_OWNERS
            for encoder in perturbing_encoders(attack)
        ],
        expand("results/plots/vulnerability/{encoder}/{attack}.png", attack=ATTACKS, encoder=ENCODERS),
        expand(
            "results/plots/heatmaps/{encoder}/{mil}/{attack}.png",
            encoder=ENCODERS if CONFIG["evaluation"]["n_heatmap_slides"] else [],
            mil=MIL_MODELS,
            attack=ATTACKS,
        ),
