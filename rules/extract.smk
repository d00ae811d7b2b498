# Tiles store -> clean features store, once per (slide, encoder); shared by every attack and MIL head.


rule extract:
    input:
        tiles="results/tiles/{slide}.zarr",
    output:
        features=directory("results/features/{encoder}/{slide}.zarr"),
    params:
        spec=lambda wildcards: spec(
            {"encoder": wildcards.encoder, "batch_size": CONFIG["extraction"]["batch_size"]}
        ),
        device=CONFIG["device"],  # not a spec: moving to a GPU must not re-run finished work
    log:
        log_path("extract", "encoder", "slide"),
    benchmark:
        benchmark_path("extract", "encoder", "slide")
    threads: 2
    resources:
        gpu=1,
        mem_mb=4000,
    conda:
        "../envs/encoders.yaml"
    script:
        "../workflow_scripts/extract.py"
