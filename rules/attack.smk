# The attack stage touches only the k selected tiles of each slide: its cost follows k, not N.


rule perturb:
    input:
        tiles="results/tiles/{slide}.zarr",
    output:
        attack=directory("results/attacks/{attack}/{encoder}/{slide}.zarr"),
    params:
        spec=lambda wildcards: spec(
            {"attack": wsiconfig.attack_spec(CONFIG, wildcards.attack), "encoder": wildcards.encoder}
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
            {"encoder": wildcards.encoder, "batch_size": CONFIG["extraction"]["batch_size"]}
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
