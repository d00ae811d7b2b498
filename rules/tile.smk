# Slides -> tiles stores (zarr v3: coordinates and geometry; pixels only with tiling.store_pixels)
# at the target resolution, plus QC thumbnails: one job per shard of slides.
import math


def slide_mpp_overrides(wildcards):
    """The sample sheet's mpp of the shard's slides that have one (part of the tiling spec)."""
    sheet = samples()
    if "mpp" not in sheet.columns:
        return {}
    mpps = {slide: float(sheet.loc[slide, "mpp"]) for slide in shard_slides(wildcards)}
    return {slide: mpp for slide, mpp in mpps.items() if not math.isnan(mpp)}


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
    params:
        spec=lambda wildcards: spec(
            {"tiling": CONFIG["tiling"], "mpp_override": slide_mpp_overrides(wildcards), "slides": shard_slides(wildcards)}
        ),
    log:
        log_path("tile", "shard"),
    benchmark:
        benchmark_path("tile", "shard")
    threads: 2  # region reads are decoded in parallel (OpenSlide releases the GIL)
    resources:
        mem_mb=2000,
    conda:
        "../envs/slides.yaml"
    script:
        "../workflow_scripts/tile.py"


rule list_skipped:
    input:
        tiles=lambda wildcards: per_shard("results/tiles/{shard}"),
    output:
        skipped="results/skipped_slides.csv",
    params:
        spec=lambda wildcards: spec({}),
    log:
        log_path("list_skipped"),
    benchmark:
        benchmark_path("list_skipped")
    conda:
        "../envs/slides.yaml"
    script:
        "../workflow_scripts/list_skipped.py"
