# The defences branch: each defence under defences.defences against each attack under
# defences.attacks, evaluated twice with the workflow's trained heads. Non-adaptive: the attack's
# own tiles (crafted without the defence) re-embedded through a tile defence (reembed_defended),
# or its own rows for a head defence. Adaptive: the attack re-run through the defence
# (attack_defended: BPDA / EOT through a tile defence, the defended head as oracle, or a penalty
# on being flagged by knn_filter). A tile defence also re-extracts the clean features through it
# (extract_defended): its clean cost. defence_table compares both with the undefended evaluation.


use rule extract as extract_defended with:
    output:
        features=directory("results/defences/features/{defence}/{encoder}/{shard}"),
    log:
        log_path("extract_defended", "defence", "encoder", "shard"),
    benchmark:
        benchmark_path("extract_defended", "defence", "encoder", "shard")
    wildcard_constraints:
        defence=names_regex(TILE_DEFENCE_NAMES),
    params:
        spec=lambda wildcards: spec(
            {
                "encoder": wsiconfig.encoder_spec(CONFIG, wildcards.encoder),
                "batch_size": CONFIG["extraction"]["batch_size"],
                "tiling": CONFIG["tiling"],
                "defence": defence_spec(wildcards.defence),
            }
        ),
        device=CONFIG["device"],


use rule reembed as reembed_defended with:
    input:
        attacks="results/attacks/{attack}/{encoder}/{shard}",
    output:
        reembedded=directory("results/defences/reembedded/{defence}/nonadaptive/{attack}/{encoder}/{shard}"),
    log:
        log_path("reembed_defended", "defence", "attack", "encoder", "shard"),
    benchmark:
        benchmark_path("reembed_defended", "defence", "attack", "encoder", "shard")
    wildcard_constraints:
        defence=names_regex(TILE_DEFENCE_NAMES),
        attack=names_regex(DEFENCE_ATTACKS),
    params:
        spec=lambda wildcards: spec(
            {
                "attack": wsiconfig.attack_spec(CONFIG, wildcards.attack),
                "encoder": wsiconfig.encoder_spec(CONFIG, wildcards.encoder),
                "batch_size": CONFIG["extraction"]["batch_size"],
                "defence": defence_spec(wildcards.defence),
            }
        ),
        device=CONFIG["device"],


use rule attack as attack_defended with:
    input:
        tiles="results/tiles/{shard}",
        features=defended_attack_features,
        splits=oracle_splits,
        mil_heads=oracle_heads,
    output:
        attacks=directory("results/defences/attacks/{defence}/{attack}/{encoder}/{shard}"),
        reembedded=directory("results/defences/reembedded/{defence}/adaptive/{attack}/{encoder}/{shard}"),
    log:
        log_path("attack_defended", "defence", "attack", "encoder", "shard"),
    benchmark:
        benchmark_path("attack_defended", "defence", "attack", "encoder", "shard")
    wildcard_constraints:
        defence=names_regex(DEFENCE_NAMES),
        attack=names_regex(DEFENCE_ATTACKS),
    params:
        spec=lambda wildcards: spec(
            {
                "attack": wsiconfig.attack_spec(CONFIG, wildcards.attack),
                "encoder": wsiconfig.encoder_spec(CONFIG, wildcards.encoder),
                "batch_size": CONFIG["extraction"]["batch_size"],
                "tiling": CONFIG["tiling"],
                "defence": defence_spec(wildcards.defence, attacker=True),
            }
        ),
        device=CONFIG["device"],


use rule evaluate as evaluate_defended with:
    input:
        splits="results/splits.csv",
        models=expand("results/mil/{{encoder}}/{{mil}}/fold{fold}/model.safetensors", fold=FOLDS),
        features=defended_features,
        reembedded=defended_reembedded,
    output:
        per_slide="results/defences/eval/{encoder}/{mil}/{defence}/{mode}/{attack}.csv",
        tile_weights=directory("results/defences/eval/{encoder}/{mil}/{defence}/{mode}/{attack}.tile_weights.zarr"),
    log:
        log_path("evaluate_defended", "encoder", "mil", "defence", "mode", "attack"),
    benchmark:
        benchmark_path("evaluate_defended", "encoder", "mil", "defence", "mode", "attack")
    wildcard_constraints:
        defence=names_regex(DEFENCE_NAMES),
        mode=names_regex(DEFENCE_MODES),
        attack=names_regex(DEFENCE_ATTACKS),
    params:
        spec=lambda wildcards: spec(
            {
                "classes": CONFIG["classes"],
                "attack": wildcards.attack,
                "n_heatmap_slides": 0,
                **threat_marking(CONFIG["attacks"][wildcards.attack]),
                "defence": defence_spec(wildcards.defence),
            }
        ),


rule defence_table:
    input:
        undefended=expand(
            "results/eval/{encoder}/{mil}/{attack}.csv", encoder=ENCODERS, mil=MIL_MODELS, attack=DEFENCE_ATTACKS
        ),
        defended=defence_evaluations(),
        splits="results/splits.csv",
    output:
        table=report("results/defences.csv", caption="captions/defences.rst", category="Defences"),
        plot=report("results/plots/defences.png", caption="captions/defences.rst", category="Defences"),
    log:
        log_path("defence_table"),
    benchmark:
        benchmark_path("defence_table")
    conda:
        "../envs/plots.yaml"
    params:
        spec=lambda wildcards: spec(
            {
                "classes": CONFIG["classes"],
                "defences": {name: defence_spec(name) for name in DEFENCE_NAMES},
                "n_bootstrap": CONFIG["evaluation"]["n_bootstrap"],
                "seed": CONFIG["evaluation"]["seed"],
            }
        ),
    script:
        "../workflow_scripts/defence_table.py"
