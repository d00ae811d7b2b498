# Cohort-level outputs: the tidy summary table and the figures of the HTML report.


rule summarize:
    input:
        evaluations=expand(
            "results/eval/{encoder}/{mil}/{attack}.csv", encoder=ENCODERS, mil=MIL_MODELS, attack=ATTACKS
        ),
        splits="results/splits.csv",  # patient_id: the bootstrap resamples patients
    output:
        summary=report("results/summary.csv", caption="captions/summary.rst", category="Summary"),
    log:
        log_path("summarize"),
    benchmark:
        benchmark_path("summarize")
    conda:
        "../envs/mil.yaml"
    params:
        spec=lambda wildcards: spec({"classes": CONFIG["classes"], **CONFIG["evaluation"]}),
    script:
        "../workflow_scripts/summarize.py"


rule plot_metrics:
    input:
        summary="results/summary.csv",
    output:
        plot=report("results/plots/metrics.png", caption="captions/metrics.rst", category="Summary"),
    log:
        log_path("plot_metrics"),
    benchmark:
        benchmark_path("plot_metrics")
    conda:
        "../envs/plots.yaml"
    params:
        spec=lambda wildcards: spec({}),
    script:
        "../workflow_scripts/plot_metrics.py"


rule plot_factors:
    input:
        summary="results/summary.csv",
    output:
        plot=report("results/plots/factors.png", caption="captions/factors.rst", category="Summary"),
    log:
        log_path("plot_factors"),
    benchmark:
        benchmark_path("plot_factors")
    conda:
        "../envs/plots.yaml"
    params:
        spec=lambda wildcards: spec({"attacks": CONFIG["attacks"]}),
    script:
        "../workflow_scripts/plot_factors.py"


rule plot_heatmaps:
    input:
        tile_weights="results/eval/{encoder}/{mil}/{attack}.tile_weights.zarr",
        tiles=lambda wildcards: per_shard("results/tiles/{shard}"),
    output:
        plot=report(
            "results/plots/heatmaps/{encoder}/{mil}/{attack}.png",
            caption="captions/heatmaps.rst",
            category="Heatmaps",
            labels={"encoder": "{encoder}", "MIL head": "{mil}", "attack": "{attack}"},
        ),
    log:
        log_path("plot_heatmaps", "encoder", "mil", "attack"),
    benchmark:
        benchmark_path("plot_heatmaps", "encoder", "mil", "attack")
    conda:
        "../envs/plots.yaml"
    params:
        spec=lambda wildcards: spec({}),
    script:
        "../workflow_scripts/plot_heatmaps.py"


rule vulnerability:
    input:
        unpack(
            lambda wildcards: {
                "tiles": per_shard("results/tiles/{shard}"),
                "features": per_shard("results/features/{encoder}/{shard}", encoder=wildcards.encoder),
                "reembedded": per_shard(
                    "results/reembedded/{attack}/{encoder}/{shard}", attack=wildcards.attack, encoder=wildcards.encoder
                ),
                **({"masks": "results/demo/masks"} if USES_DEMO else {}),
            }
        ),
    output:
        table="results/vulnerability/{encoder}/{attack}.csv",
        correlations=report(
            "results/vulnerability/{encoder}/{attack}.correlations.csv",
            caption="captions/vulnerability.rst",
            category="Vulnerability vs content",
            labels={"encoder": "{encoder}", "attack": "{attack}", "figure": "correlations"},
        ),
        plot=report(
            "results/plots/vulnerability/{encoder}/{attack}.png",
            caption="captions/vulnerability.rst",
            category="Vulnerability vs content",
            labels={"encoder": "{encoder}", "attack": "{attack}", "figure": "scatter"},
        ),
    log:
        log_path("vulnerability", "encoder", "attack"),
    benchmark:
        benchmark_path("vulnerability", "encoder", "attack")
    conda:
        "../envs/plots.yaml"
    params:
        spec=lambda wildcards: spec({"encoder": wildcards.encoder, "attack": wildcards.attack}),
    script:
        "../workflow_scripts/vulnerability.py"


rule plot_examples:
    input:
        tiles=lambda wildcards: expand("results/tiles/{shard}", shard=example_shards(wildcards)),
        attacks=lambda wildcards: [
            attack_dir(wildcards.attack, wildcards.encoder, shard) for shard in example_shards(wildcards)
        ],
    output:
        plot=report(
            "results/plots/examples/{attack}/{encoder}.png",
            caption="captions/examples.rst",
            category="Adversarial tiles",
            labels={"attack": "{attack}", "encoder": "{encoder}"},
        ),
    log:
        log_path("plot_examples", "attack", "encoder"),
    benchmark:
        benchmark_path("plot_examples", "attack", "encoder")
    conda:
        "../envs/plots.yaml"
    params:
        spec=lambda wildcards: spec({"n_example_tiles": CONFIG["evaluation"]["n_example_tiles"]}),
        slides=example_slides,
    script:
        "../workflow_scripts/plot_examples.py"


rule plot_universal:
    input:
        patterns=universal_patterns,
    output:
        plot=report(
            "results/plots/universal/{attack}/{encoder}.png",
            caption="captions/universal.rst",
            category="Universal perturbations",
            labels={"attack": "{attack}", "encoder": "{encoder}"},
        ),
    log:
        log_path("plot_universal", "attack", "encoder"),
    benchmark:
        benchmark_path("plot_universal", "attack", "encoder")
    wildcard_constraints:
        attack=names_regex(PATTERN_OWNERS),
    conda:
        "../envs/plots.yaml"
    params:
        spec=lambda wildcards: spec({}),
    script:
        "../workflow_scripts/plot_universal.py"


rule transfer_matrix:
    input:
        summary="results/summary.csv",
    output:
        table="results/transfer.csv",
        plot=report("results/plots/transfer.png", caption="captions/transfer.rst", category="Summary"),
    log:
        log_path("transfer_matrix"),
    benchmark:
        benchmark_path("transfer_matrix")
    conda:
        "../envs/plots.yaml"
    params:
        spec=lambda wildcards: spec({"transfer": CONFIG.get("transfer"), "attacks": CONFIG["attacks"]}),
    script:
        "../workflow_scripts/transfer_matrix.py"
