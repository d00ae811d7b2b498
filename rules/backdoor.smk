# The backdoor branch (BAPLe in the MIL head): per (encoder, trigger, target, shots), one job trains
# a head per fold on its training slides with poison_rate of them triggered and relabelled to the
# target (head and trigger noise learn together), then tests every test slide clean and triggered.
# The clean head (nothing poisoned, tested with the patch alone) is a job per (encoder, shots).
# backdoor_table reads every job's per-slide CSV into results/backdoor.csv and its plot.


rule backdoor:
    input:
        splits="results/splits.csv",
        features=clean_features,
        tiles=lambda wildcards: per_shard("results/tiles/{shard}"),
    output:
        per_slide=f"{BACKDOOR_DIR}/{{trigger}}/{{target}}/shots_{{shots}}.csv",
        store=directory(f"{BACKDOOR_DIR}/{{trigger}}/{{target}}/shots_{{shots}}.zarr"),
    log:
        log_path("backdoor", "encoder", "mil", "trigger", "target", "shots"),
    benchmark:
        benchmark_path("backdoor", "encoder", "mil", "trigger", "target", "shots")
    wildcard_constraints:
        trigger=names_regex(BACKDOOR["triggers"] if BACKDOOR else []),
        target=names_regex(BACKDOOR["targets"] if BACKDOOR else []),
        shots=names_regex(BACKDOOR_SHOTS),
    conda:
        "../envs/encoders.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=gpu_job_mem_mb,
    params:
        spec=lambda wildcards: spec(
            {
                **wsiconfig.backdoor_spec(
                    CONFIG, trigger=wildcards.trigger, target=wildcards.target, shots=wildcards.shots
                ),
                "encoder": wsiconfig.encoder_spec(CONFIG, wildcards.encoder),
                "batch_size": CONFIG["extraction"]["batch_size"],
                "tiling": CONFIG["tiling"],
            }
        ),
        device=CONFIG["device"],
    script:
        "../workflow_scripts/backdoor.py"


use rule backdoor as backdoor_clean_head with:
    output:
        per_slide=f"{BACKDOOR_DIR}/clean/shots_{{shots}}.csv",
        store=directory(f"{BACKDOOR_DIR}/clean/shots_{{shots}}.zarr"),
    log:
        log_path("backdoor_clean_head", "encoder", "mil", "shots"),
    benchmark:
        benchmark_path("backdoor_clean_head", "encoder", "mil", "shots")
    params:
        spec=lambda wildcards: spec(
            {
                **wsiconfig.backdoor_spec(CONFIG, trigger="clean", target=None, shots=wildcards.shots),
                "encoder": wsiconfig.encoder_spec(CONFIG, wildcards.encoder),
                "batch_size": CONFIG["extraction"]["batch_size"],
                "tiling": CONFIG["tiling"],
            }
        ),
        device=CONFIG["device"],


rule backdoor_table:
    input:
        per_slide=backdoor_results(".csv"),
    output:
        table=report("results/backdoor.csv", caption="captions/backdoor.rst", category="Backdoor"),
        plot=report("results/plots/backdoor.png", caption="captions/backdoor.rst", category="Backdoor"),
    log:
        log_path("backdoor_table"),
    benchmark:
        benchmark_path("backdoor_table")
    conda:
        "../envs/plots.yaml"
    params:
        spec=lambda wildcards: spec({"classes": CONFIG["classes"], "targets": BACKDOOR["targets"]}),
    script:
        "../workflow_scripts/backdoor_table.py"


rule plot_backdoor_trigger:
    input:
        store=backdoor_example,
    output:
        plot=report(
            "results/plots/backdoor/{encoder}_trigger.png",
            caption="captions/backdoor_trigger.rst",
            category="Backdoor",
        ),
    log:
        log_path("plot_backdoor_trigger", "encoder"),
    benchmark:
        benchmark_path("plot_backdoor_trigger", "encoder")
    conda:
        "../envs/plots.yaml"
    params:
        spec=lambda wildcards: spec({}),
    script:
        "../workflow_scripts/plot_backdoor_trigger.py"
