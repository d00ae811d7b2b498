# The attack stage touches only the k selected tiles of each slide: its cost follows k, not N.
# Gray-box attacks (selection attention, objective mil_cross_entropy) also read the trained MIL
# heads: every fold's, because the slide's test fold is only known once results/splits.csv exists
# (the script picks it), so they wait for train_mil; the label-free attacks do not.
from wsiattack.attacks.params import uses_mil_head


def selection_features(wildcards):
    """Clean features, for the selections that rank tiles by them and the gray-box attacks' bag."""
    entry = CONFIG["attacks"][wildcards.attack]
    if entry["selection"] in ("centrality", "vulnerability") or uses_mil_head(entry):
        return f"results/features/{wildcards.encoder}/{wildcards.slide}.zarr"
    return []


def oracle_splits(wildcards):
    return "results/splits.csv" if uses_mil_head(CONFIG["attacks"][wildcards.attack]) else []


def oracle_heads(wildcards):
    """Every fold's head of the attack's MIL model on this encoder (gray-box attacks only)."""
    entry = CONFIG["attacks"][wildcards.attack]
    if not uses_mil_head(entry):
        return []
    return expand("results/mil/{encoder}/{mil}/fold{fold}/model.safetensors", encoder=wildcards.encoder, mil=entry["mil"], fold=FOLDS)


rule perturb:
    input:
        tiles="results/tiles/{slide}.zarr",
        features=selection_features,
        splits=oracle_splits,
        mil_heads=oracle_heads,
    output:
        attack=directory("results/attacks/{attack}/{encoder}/{slide}.zarr"),
    params:
        spec=lambda wildcards: spec(
            {
                "attack": wsiconfig.attack_spec(CONFIG, wildcards.attack),
                "encoder": wsiconfig.encoder_spec(CONFIG, wildcards.encoder),
                "tiling": CONFIG["tiling"],
            }
        ),
        device=CONFIG["device"],
    log:
        log_path("perturb", "attack", "encoder", "slide"),
    benchmark:
        benchmark_path("perturb", "attack", "encoder", "slide")
    threads: 1  # k tiles only: start-up dominates, so let two jobs share a 2-core machine
    resources:
        gpu=1,
        mem_mb=4000,
    conda:
        "../envs/encoders.yaml"
    script:
        "../workflow_scripts/perturb.py"


rule reembed:
    input:
        attack="results/attacks/{attack}/{encoder}/{slide}.zarr",
    output:
        features=directory("results/reembedded/{attack}/{encoder}/{slide}.zarr"),
    params:
        spec=lambda wildcards: spec(
            {
                "encoder": wsiconfig.encoder_spec(CONFIG, wildcards.encoder),
                "batch_size": CONFIG["extraction"]["batch_size"],
            }
        ),
        device=CONFIG["device"],
    log:
        log_path("reembed", "attack", "encoder", "slide"),
    benchmark:
        benchmark_path("reembed", "attack", "encoder", "slide")
    threads: 1  # k tiles only: start-up dominates, so let two jobs share a 2-core machine
    resources:
        gpu=1,
        mem_mb=4000,
    conda:
        "../envs/encoders.yaml"
    script:
        "../workflow_scripts/reembed.py"
