# Clean features, once per (encoder, shard of slides): one job loads the encoder once for all the
# shard's slides and writes one features store per slide, shared by every attack and MIL head.
# The shard's slides are the stores in its tiles directory, and their pixels are re-read from the
# slides at the paths those stores recorded (the sample sheet's): the job needs neither the sheet
# nor the demo checkpoint (a cluster job could not wait for it), and a slide that changes re-runs
# its tile job and so everything after it.


rule extract:
    input:
        tiles="results/tiles/{shard}",
    output:
        features=directory("results/features/{encoder}/{shard}"),
    log:
        log_path("extract", "encoder", "shard"),
    benchmark:
        benchmark_path("extract", "encoder", "shard")
    conda:
        "../envs/encoders.yaml"
    threads: 1  # torch, plus one background thread decoding the slide's tiles
    resources:
        gpu=1,
        mem_mb=gpu_job_mem_mb,
    params:
        spec=lambda wildcards: spec(
            {
                "encoder": wsiconfig.encoder_spec(CONFIG, wildcards.encoder),
                "batch_size": CONFIG["extraction"]["batch_size"],
                "tiling": CONFIG["tiling"],
            }
        ),
        device=CONFIG["device"],  # not a spec: moving to a GPU must not re-run finished work
    script:
        "../workflow_scripts/extract.py"
