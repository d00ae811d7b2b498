# Slides -> tiles stores (zarr v3: coordinates and geometry; pixels only with tiling.store_pixels)
# at the target resolution, plus QC thumbnails: one job per shard of slides.


rule tile:
    input:
        slides=lambda wildcards: [samples().loc[s, "path"] for s in shard_slides(wildcards)],
    output:
        tiles=directory("results/tiles/{shard}"),
        qc=report(
            directory("results/qc/{shard}"),
            patterns=["{slide}.png"],
            caption="captions/qc.rst",
            category="Tiling QC",
        ),
    log:
        log_path("tile", "shard"),
    benchmark:
        benchmark_path("tile", "shard")
    conda:
        "../envs/slides.yaml"
    threads: 2  # region reads are decoded in parallel (OpenSlide releases the GIL)
    resources:
        mem_mb=2000,
    params:
        spec=lambda wildcards: spec(
            {
                "tiling": CONFIG["tiling"],
                "mpp_override": slide_mpp_overrides(wildcards),
                "slides": shard_slides(wildcards),
            }
        ),
    script:
        "../workflow_scripts/tile.py"


rule list_skipped:
    input:
        tiles=lambda wildcards: per_shard("results/tiles/{shard}"),
    output:
        skipped="results/skipped_slides.csv",
    log:
        log_path("list_skipped"),
    benchmark:
        benchmark_path("list_skipped")
    conda:
        "../envs/slides.yaml"
    params:
        spec=lambda wildcards: spec({}),
    script:
        "../workflow_scripts/list_skipped.py"
