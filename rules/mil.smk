# MIL heads trained on clean features only (k-fold cross-validation), then evaluated on clean
# and attacked bags of their test slides.
from wsiattack.attacks.params import threat_marking


rule split:
    input:
        samples=CONFIG["samples"],
    output:
        splits="results/splits.csv",
    log:
        log_path("split"),
    benchmark:
        benchmark_path("split")
    conda:
        "../envs/mil.yaml"
    params:
        spec=lambda wildcards: spec(wsiconfig.split_spec(CONFIG)),
    script:
        "../workflow_scripts/split.py"


rule train_mil:
    input:
        splits="results/splits.csv",
        features=clean_features,
    output:
        model="results/mil/{encoder}/{mil}/fold{fold}/model.safetensors",
    log:
        log_path("train_mil", "encoder", "mil", "fold"),
    benchmark:
        benchmark_path("train_mil", "encoder", "mil", "fold")
    conda:
        "../envs/mil.yaml"
    threads: 1
    resources:
        gpu=1,  # trains on a GPU where there is one (device), streaming the bags from disk
    params:
        spec=lambda wildcards: spec(
            {**wsiconfig.mil_spec(CONFIG, wildcards.mil), "fold": int(wildcards.fold), "classes": CONFIG["classes"]}
        ),
        device=CONFIG["device"],
    script:
        "../workflow_scripts/train_mil.py"


rule evaluate:
    input:
        splits="results/splits.csv",
        models=expand("results/mil/{{encoder}}/{{mil}}/fold{fold}/model.safetensors", fold=FOLDS),
        features=clean_features,
        reembedded=lambda wildcards: per_shard(
            "results/reembedded/{attack}/{encoder}/{shard}", attack=wildcards.attack, encoder=wildcards.encoder
        ),
    output:
        per_slide="results/eval/{encoder}/{mil}/{attack}.csv",
        tile_weights=directory("results/eval/{encoder}/{mil}/{attack}.tile_weights.zarr"),
    log:
        log_path("evaluate", "encoder", "mil", "attack"),
    benchmark:
        benchmark_path("evaluate", "encoder", "mil", "attack")
    conda:
        "../envs/mil.yaml"
    threads: 1
    params:
        # the marking is part of what the table states (and re-runs tables written before it)
        spec=lambda wildcards: spec(
            {
                "classes": CONFIG["classes"],
                "attack": wildcards.attack,
                "n_heatmap_slides": CONFIG["evaluation"]["n_heatmap_slides"],
                **threat_marking(CONFIG["attacks"][wildcards.attack]),
            }
        ),
    script:
        "../workflow_scripts/evaluate.py"
