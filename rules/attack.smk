# The attack stage touches only the k selected tiles of each slide: its cost follows k, not N.
# One job per (attack, encoder, shard) builds the encoder once, then perturbs each slide's k
# tiles and re-embeds them (two library steps, one process): attack and re-embedded stores.
# Gray-box attacks (selection attention, objective mil_cross_entropy) also read the trained MIL
# heads: every fold's, because the slide's test fold is only known once results/splits.csv exists
# (the script picks it), so they wait for train_mil; the label-free attacks do not.


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
    conda:
        "../envs/encoders.yaml"
    threads: 1  # k tiles per slide: let two jobs share a 2-core machine
    resources:
        gpu=1,
        mem_mb=4000,
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
