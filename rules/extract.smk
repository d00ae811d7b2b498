# Tiles store -> clean features store, once per (slide, encoder); shared by every attack and MIL head.


rule extract:
    input:
        tiles="results/tiles/{slide}.zarr",
    output:
        features=directory("results/features/{encoder}/{slide}.zarr"),
    params:
        spec=lambda wildcards: spec(
            {
                "encoder": wsiconfig.encoder_spec(CONFIG, wildcards.encoder),
                "batch_size": CONFIG["extraction"]["batch_size"],
                "tiling": CONFIG["tiling"],
            }
        ),
        device=CONFIG["device"],  # not a spec: moving to a GPU must not re-run finished work
    log:
        log_path("extract", "encoder", "slide"),
    benchmark:
        benchmark_path("extract", "encoder", "slide")
    threads: 1  # two single-threaded jobs beat one two-threaded job: start-up is serial
    resources:
        gpu=1,
        mem_mb=4000,
    conda:
        "../envs/encoders.yaml"
    script:
        "../workflow_scripts/extract.py"
