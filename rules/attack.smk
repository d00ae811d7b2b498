# The attack stage touches only the k selected tiles of each slide: its cost follows k, not N.
# One job per (attack, encoder, shard) builds the encoder once, then perturbs each slide's k
# tiles and re-embeds them (two library steps, one process): attack and re-embedded stores.
# Gray-box attacks (selection attention, objective mil_cross_entropy) also read the trained MIL
# heads: every fold's, because the slide's test fold is only known once results/splits.csv exists
# (the script picks it), so they wait for train_mil; the label-free attacks do not.
# Derived attacks are re-embedded by a job of their own (rule reembed): a transfer attack is
# perturbed once on its surrogate (perturb_surrogate), then re-embedded by every target encoder; a
# shuffled control is made from its source's stored tiles (shuffle) without running an encoder;
# a universal perturbation is learned once per (encoder, fold) on the fold's training slides
# (learn_universal; entries that differ only in budget share it), then added to every shard's
# tiles (apply_universal) without an encoder.


rule attack:
    input:
        tiles="results/tiles/{shard}",
        features=selection_features,
        splits=oracle_splits,
        mil_heads=oracle_heads,
    output:
        attacks=directory("results/attacks/{attack}/{encoder}/{shard}"),
        reembedded=directory("results/reembedded/{attack}/{encoder}/{shard}"),
    log:
        log_path("attack", "attack", "encoder", "shard"),
    benchmark:
        benchmark_path("attack", "attack", "encoder", "shard")
    wildcard_constraints:
        attack=names_regex(DIRECT_ATTACKS),
    conda:
        "../envs/encoders.yaml"
    threads: 1  # k tiles per slide: let two jobs share a 2-core machine
    resources:
        gpu=1,
        mem_mb=gpu_job_mem_mb,
    params:
        spec=lambda wildcards: spec(
            {
                "attack": wsiconfig.attack_spec(CONFIG, wildcards.attack),
                "encoder": wsiconfig.encoder_spec(CONFIG, wildcards.encoder),
                "batch_size": CONFIG["extraction"]["batch_size"],
                "tiling": CONFIG["tiling"],
            }
        ),
        device=CONFIG["device"],
    script:
        "../workflow_scripts/attack.py"


rule perturb_surrogate:
    input:
        tiles="results/tiles/{shard}",
        features=selection_features,
    output:
        attacks=directory("results/attacks/{attack}/{encoder}/{shard}"),
    log:
        log_path("perturb_surrogate", "attack", "encoder", "shard"),
    benchmark:
        benchmark_path("perturb_surrogate", "attack", "encoder", "shard")
    wildcard_constraints:
        attack=names_regex(SURROGATE_ATTACKS),
    conda:
        "../envs/encoders.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=gpu_job_mem_mb,
    params:
        spec=lambda wildcards: spec(
            {
                "attack": wsiconfig.attack_spec(CONFIG, wildcards.attack),
                "encoder": wsiconfig.encoder_spec(CONFIG, wildcards.encoder),
                "batch_size": CONFIG["extraction"]["batch_size"],
                "tiling": CONFIG["tiling"],
            }
        ),
        device=CONFIG["device"],
    script:
        "../workflow_scripts/attack.py"


rule shuffle:
    input:
        tiles="results/tiles/{shard}",
        source=shuffle_source,
    output:
        attacks=directory("results/attacks/{attack}/{encoder}/{shard}"),
    log:
        log_path("shuffle", "attack", "encoder", "shard"),
    benchmark:
        benchmark_path("shuffle", "attack", "encoder", "shard")
    wildcard_constraints:
        attack=names_regex(SHUFFLED_ATTACKS),
    conda:
        "../envs/encoders.yaml"
    params:
        spec=lambda wildcards: spec(
            {"attack": wsiconfig.attack_spec(CONFIG, wildcards.attack), "tiling": CONFIG["tiling"]}
        ),
    script:
        "../workflow_scripts/shuffle.py"


rule learn_universal:
    input:
        tiles=lambda wildcards: per_shard("results/tiles/{shard}"),
        splits="results/splits.csv",
    output:
        pattern=directory("results/universal/{attack}/{encoder}/fold{fold}.zarr"),
    log:
        log_path("learn_universal", "attack", "encoder", "fold"),
    benchmark:
        benchmark_path("learn_universal", "attack", "encoder", "fold")
    wildcard_constraints:
        attack=names_regex(PATTERN_OWNERS),
    conda:
        "../envs/encoders.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=gpu_job_mem_mb,
    params:
        spec=lambda wildcards: spec(
            {
                "attack": learning_spec(wsiconfig.attack_spec(CONFIG, wildcards.attack)),
                "encoder": wsiconfig.encoder_spec(CONFIG, wildcards.encoder),
                "tiling": CONFIG["tiling"],
            }
        ),
        device=CONFIG["device"],
    script:
        "../workflow_scripts/learn_universal.py"


rule apply_universal:
    input:
        tiles="results/tiles/{shard}",
        splits="results/splits.csv",
        patterns=universal_patterns,
    output:
        attacks=directory("results/attacks/{attack}/{encoder}/{shard}"),
    log:
        log_path("apply_universal", "attack", "encoder", "shard"),
    benchmark:
        benchmark_path("apply_universal", "attack", "encoder", "shard")
    wildcard_constraints:
        attack=names_regex(UNIVERSAL_ATTACKS),
    conda:
        "../envs/encoders.yaml"
    params:
        spec=lambda wildcards: spec(
            {"attack": wsiconfig.attack_spec(CONFIG, wildcards.attack), "tiling": CONFIG["tiling"]}
        ),
    script:
        "../workflow_scripts/apply_universal.py"


rule reembed:
    input:
        attacks=derived_attack_dir,
    output:
        reembedded=directory("results/reembedded/{attack}/{encoder}/{shard}"),
    log:
        log_path("reembed", "attack", "encoder", "shard"),
    benchmark:
        benchmark_path("reembed", "attack", "encoder", "shard")
    wildcard_constraints:
        attack=names_regex(DERIVED_ATTACKS),
    conda:
        "../envs/encoders.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=gpu_job_mem_mb,
    params:
        spec=lambda wildcards: spec(
            {
                "attack": wsiconfig.attack_spec(CONFIG, wildcards.attack),
                "encoder": wsiconfig.encoder_spec(CONFIG, wildcards.encoder),
                "batch_size": CONFIG["extraction"]["batch_size"],
            }
        ),
        device=CONFIG["device"],
    script:
        "../workflow_scripts/reembed.py"
