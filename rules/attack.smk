# The attack stage touches only the k selected tiles of each slide: its cost follows k, not N.
# One job per (attack, encoder, shard) builds the encoder once, then perturbs each slide's k
# tiles and re-embeds them (two library steps, one process): attack and re-embedded stores.
# Gray-box attacks (selection attention, objective mil_cross_entropy) also read the trained MIL
# heads: every fold's, because the slide's test fold is only known once results/splits.csv exists
# (the script picks it), so they wait for train_mil; the label-free attacks do not.
from wsiattack.attacks.params import uses_mil_head


def selection_features(wildcards):
    """Clean features, for the selections that rank tiles by them and the gray-box attacks' bag."""
    entry = CONFIG["attacks"][wildcards.attack]
    if entry["selection"] in ("centrality", "vulnerability") or uses_mil_head(entry):
        return f"results/features/{wildcards.encoder}/{wildcards.shard}"
    return []


def oracle_splits(wildcards):
    return "results/splits.csv" if uses_mil_head(CONFIG["attacks"][wildcards.attack]) else []


def oracle_heads(wildcards):
    """Every fold's head of the attack's MIL model on this encoder (gray-box attacks only)."""
    entry = CONFIG["attacks"][wildcards.attack]
    if not uses_mil_head(entry):
        return []
    return expand("results/mil/{encoder}/{mil}/fold{fold}/model.safetensors", encoder=wildcards.encoder, mil=entry["mil"], fold=FOLDS)


rule attack:
    input:
        tiles="results/tiles/{shard}",
        features=selection_features,
        splits=oracle_splits,
        mil_heads=oracle_heads,
    output:
        attacks=directory("results/attacks/{attack}/{encoder}/{shard}"),
        reembedded=directory("results/reembedded/{attack}/{encoder}/{shard}"),
    params:
        spec=lambda wildcards: spec(
            {
                "attack": wsiconfig.attack_spec(CONFIG, wildcards.attack),
                "encoder": wsiconfig.encoder_spec(CONFIG, wildcards.encoder),
                "batch_size": CONFIG["extraction"]["batch_size"],
                "tiling": CONFIG["tiling"],
            }
        ),
        device=CONFIG["device"],
    log:
        log_path("attack", "attack", "encoder", "shard"),
    benchmark:
        benchmark_path("attack", "attack", "encoder", "shard")
    threads: 1  # k tiles per slide: let two jobs share a 2-core machine
    resources:
        gpu=1,
        mem_mb=4000,
    conda:
        "../envs/encoders.yaml"
    script:
        "../workflow_scripts/attack.py"
