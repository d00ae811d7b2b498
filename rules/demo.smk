# The embedded demo cohort: synthetic pyramidal TIFF slides and their sample sheet. A checkpoint,
# because the slide ids are only known once the sample sheet exists.


checkpoint demo_cohort:
    output:
        samples=wsiconfig.DEMO_SAMPLES,
        slides=directory("results/demo/slides"),
        masks=directory("results/demo/masks"),  # the generator's tumour masks: ground truth per tile
    log:
        log_path("demo_cohort"),
    benchmark:
        benchmark_path("demo_cohort")
    conda:
        "../envs/slides.yaml"
    threads: 2
    params:
        spec=lambda wildcards: spec({"demo": CONFIG["demo"], "classes": CONFIG["classes"]}),
    script:
        "../workflow_scripts/demo_cohort.py"
