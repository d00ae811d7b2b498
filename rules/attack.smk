# The attack stage touches only the k selected tiles of each slide: its cost follows k, not N.


def selection_features(wildcards):
    """Clean features, for the selections that rank tiles by them."""
    if CONFIG["attacks"][wildcards.attack]["selection"] in ("centrality", "vulnerability"):
        return f"results/features/{wildcards.encoder}/{wildcards.slide}.zarr"
    return []


rule perturb:
    input:
        tiles="results/tiles/{slide}.zarr",
        features=selection_features,
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
