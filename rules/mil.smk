# MIL heads trained on clean features only (k-fold cross-validation), then evaluated on clean
# and attacked bags of their test slides.
from wsiattack.attacks.params import threat_marking


rule split:
    input:
        samples=CONFIG["samples"],
    output:
        splits="results/splits.csv",
    params:
        spec=lambda wildcards: spec(wsiconfig.split_spec(CONFIG)),
    log:
        log_path("split"),
    benchmark:
        benchmark_path("split")
    conda:
        "../envs/mil.yaml"
    script:
        "../workflow_scripts/split.py"


def clean_features(wildcards):
    return per_shard("results/features/{encoder}/{shard}", encoder=wildcards.encoder)


rule train_mil:
    input:
        splits="results/splits.csv",
        features=clean_features,
    output:
        model="results/mil/{encoder}/{mil}/fold{fold}/model.safetensors",
    params:
        spec=lambda wildcards: spec(
            {**wsiconfig.mil_spec(CONFIG, wildcards.mil), "fold": int(wildcards.fold), "classes": CONFIG["classes"]}
        ),
    log:
        log_path("train_mil", "encoder", "mil", "fold"),
    benchmark:
        benchmark_path("train_mil", "encoder", "mil", "fold")
    threads: 1
    conda:
        "../envs/mil.yaml"
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
    log:
        log_path("evaluate", "encoder", "mil", "attack"),
    benchmark:
        benchmark_path("evaluate", "encoder", "mil", "attack")
    threads: 1
    conda:
        "../envs/mil.yaml"
    script:
        "../workflow_scripts/evaluate.py"
