# Slide -> tiles store (zarr v3) at the target resolution, plus a QC thumbnail.
import math


def slide_mpp_override(slide):
    sheet = samples()
    if "mpp" not in sheet.columns:
        return None
    mpp = float(sheet.loc[slide, "mpp"])
    return None if math.isnan(mpp) else mpp


rule tile:
    input:
        slide=lambda wildcards: samples().loc[wildcards.slide, "path"],
    output:
        store=directory("results/tiles/{slide}.zarr"),
        qc=report(
            "results/qc/{slide}.png",
            caption="captions/qc.rst",
            category="Tiling QC",
            labels={"slide": "{slide}"},
        ),
    params:
        spec=lambda wildcards: spec(
            {"tiling": CONFIG["tiling"], "mpp_override": slide_mpp_override(wildcards.slide)}
        ),
    log:
        log_path("tile", "slide"),
    benchmark:
        benchmark_path("tile", "slide")
    threads: 2  # region reads are decoded in parallel (OpenSlide releases the GIL)
    resources:
        mem_mb=2000,
    conda:
        "../envs/slides.yaml"
    script:
        "../workflow_scripts/tile.py"


rule list_skipped:
    input:
        tiles=lambda wildcards: expand("results/tiles/{slide}.zarr", slide=slide_ids()),
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
