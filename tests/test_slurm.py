"""The tiny config through profiles/slurm on a live single-node SLURM (tests/live_slurm.py).

Slow tier. Skipped, with the reason, where SLURM can't be installed or started (`make test`
installs slurm-wlm and munge with apt-get when it runs as root).
"""

import subprocess
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from helpers import ROOT, run_snakemake, snakemake_command
from live_slurm import LiveSlurm, unavailable_reason
from small_tiny import write_small_tiny_config
from wsiattack import cluster, stores
from wsiattack.shards import partition, shard_of

pytestmark = pytest.mark.slow
LOCAL_RULES = cluster.local_rules(ROOT / "Snakefile")
PROFILE = ROOT / "profiles" / "slurm" / "config.yaml"
# Kills a hung run. The bar is 5 minutes for the whole test; the margin is for slower machines.
HARD_TIMEOUT_S = 600
# What the cluster mapping needs of the tiny config: the node runs two GPU jobs at a time, each
# 20-49 s on a slow test machine, mostly starting Snakemake twice and importing torch and timm.
N_SLIDES = 4
ATTACKS = ("pgd",)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with LiveSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def slurm_run(slurm, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny_slurm")
    write_small_tiny_config(workdir / "config.yaml", n_slides=N_SLIDES, attacks=ATTACKS)
    command = [
        *snakemake_command(workdir, cores=None, gpu_tokens=None),
        "--workflow-profile",
        str(ROOT / "profiles" / "slurm"),
        # A one-node test cluster answers at once: poll it often instead of the profile's cluster pace.
        "--slurm-init-seconds-before-status-checks",
        "1",
        "--seconds-between-status-checks",
        "2",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=HARD_TIMEOUT_S, cwd=workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return workdir, slurm.jobs()


def rule_of(job: dict[str, str]) -> str:
    """From the plugin's comment, rule_<rule or group job name>[_wildcards_...]."""
    return job["Comment"].removeprefix("rule_").split("_wildcards_")[0]


def test_every_job_ran_on_slurm_and_gpu_rules_asked_for_a_gpu(slurm_run):
    workdir, jobs = slurm_run
    assert jobs and all(job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" for job in jobs)
    gpu_jobs = [job for job in jobs if "gres:gpu:1" in job.get("TresPerJob", "")]
    cpu_jobs = [job for job in jobs if job not in gpu_jobs]
    gpu_rules = [rule_of(job) for job in gpu_jobs]
    n_shards = len(partition([f"demo_{i:03d}" for i in range(N_SLIDES)], n_shards=4))  # the default shard count
    assert sorted(set(gpu_rules)) == ["attack", "extract", "train_mil"]  # one job per shard, perturb + re-embed in one
    assert gpu_rules.count("extract") == n_shards and gpu_rules.count("attack") == n_shards * len(ATTACKS)
    assert all(job["Partition"] == "gpu" for job in gpu_jobs)
    assert {rule_of(job) for job in cpu_jobs} == {"tile", "evaluate"}
    assert not LOCAL_RULES & {rule_of(job) for job in jobs}  # they ran beside Snakemake (outputs: next test)
    assert all(job["Partition"] == "cpu" and "gpu" not in job.get("TresPerJob", "") for job in cpu_jobs)
    # the profile's sizes reached SLURM: tile asks for its sized memory on attempt 1
    tile_job = next(job for job in cpu_jobs if rule_of(job) == "tile")
    assert "mem=1000M" in tile_job["TRES"]
    # and a GPU job its rule's base plus its encoder's weights, evaluated by Snakemake per job
    extract = yaml.safe_load(PROFILE.read_text())["set-resources"]["extract"]["mem_mb"]
    expected = eval(extract, {"wildcards": SimpleNamespace(encoder="demo_trained"), "attempt": 1})
    extract_job = next(job for job in gpu_jobs if rule_of(job) == "extract")
    assert f"mem={expected}M" in extract_job["TRES"]


def test_outputs_are_complete_and_consistent(slurm_run):
    workdir, _ = slurm_run
    results = workdir / "results"
    summary = pd.read_csv(results / "summary.csv")
    assert set(summary["attack"]) == set(ATTACKS) and len(summary) == 8 * len(ATTACKS)
    shift = summary[summary["metric"] == "tile_cosine_distance"].set_index("attack")["attacked"]
    assert shift["pgd"] > 1e-3  # 3 PGD steps of 2/255 move the tiles' features (noise: ~1e-5)
    slide_ids = pd.read_csv(results / "demo" / "samples.csv")["slide_id"]
    assert len(slide_ids) == N_SLIDES
    for slide in slide_ids:
        for attack in ATTACKS:
            stores.open_store(
                results / "reembedded" / attack / "demo_trained" / shard_of(slide, n_shards=4) / f"{slide}.zarr",
                kind=stores.REEMBEDDED,
            )
    assert not list(results.rglob(".*.tmp-*"))  # no half-written output left anywhere
    # The local executor agrees that nothing is missing or stale.
    dry = run_snakemake(workdir, "--dry-run", cores=1, gpu_tokens=None, timeout_s=120)
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr
