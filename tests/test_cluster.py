"""Cluster profile: resource sizing from benchmark files, the SLURM profile's shape, and the stores'
clean-up of what killed jobs leave behind."""

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from helpers import ROOT
from wsiattack import cluster, stores
from wsiattack.encoders import registry
from wsiattack.encoders.custom import custom_spec
from wsiattack.errors import StoreError

PROFILE = ROOT / "profiles" / "slurm" / "config.yaml"
HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def write_benchmark(path: Path, *, wall_s: float, rss_mb: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{wall_s}\t0:00:01\t{rss_mb}\t1\t1\t1\t0\t0\t50\t1\n")


def test_sizes_follow_the_worst_job_of_each_rule(tmp_path):
    write_benchmark(tmp_path / "extract" / "a.tsv", wall_s=100, rss_mb=900)
    write_benchmark(tmp_path / "extract" / "b.tsv", wall_s=700, rss_mb=2100)
    write_benchmark(tmp_path / "tile" / "a.tsv", wall_s=3, rss_mb=150)
    usage = {u.rule: u for u in cluster.read_benchmarks(tmp_path)}
    assert usage["extract"].n_jobs == 2 and usage["extract"].max_rss_mb == 2100 and usage["extract"].max_wall_s == 700
    extract = cluster.size_rule(usage["extract"], gpu=True)
    assert extract.mem_mb == 3500  # 1.5 x 2100 = 3150, up to the next 500 MB
    assert extract.runtime_min == 35  # 3 x 700 s
    tile = cluster.size_rule(usage["tile"], gpu=False)
    assert (tile.mem_mb, tile.runtime_min) == (cluster.MEM_FLOOR_MB, cluster.RUNTIME_FLOOR_MIN)


def test_no_benchmarks_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="no benchmark files"):
        cluster.read_benchmarks(tmp_path)


def test_gpu_rules_are_read_from_the_rules():
    assert cluster.gpu_rules(ROOT / "rules") == {
        "extract",
        "attack",
        "perturb_surrogate",
        "reembed",
        "learn_universal",
        "backdoor",
        "backdoor_clean_head",  # use rule backdoor as ...: inherits gpu=1
        "extract_defended",
        "reembed_defended",
        "attack_defended",
        "train_mil",  # trains on a GPU where there is one
    }
    # all but train_mil load an encoder, so their memory follows it
    assert cluster.encoder_rules(ROOT / "rules") == cluster.gpu_rules(ROOT / "rules") - {"train_mil"}


def test_local_rules_are_read_from_the_snakefile():
    assert cluster.local_rules(ROOT / "Snakefile") == {
        "all",
        "demo_cohort",
        "split",
        "list_skipped",
        "summarize",
        "plot_metrics",
        "plot_examples",
        "plot_factors",
        "plot_heatmaps",
        "vulnerability",
        "transfer_matrix",
        "plot_universal",
        "backdoor_table",
        "plot_backdoor_trigger",
        "defence_table",
    }


def test_profile_block_is_replaced_and_the_rest_kept(tmp_path):
    write_benchmark(tmp_path / "bench" / "attack" / "a.tsv", wall_s=10, rss_mb=900)
    write_benchmark(tmp_path / "bench" / "summarize" / "a.tsv", wall_s=10, rss_mb=900)  # a local rule: not sized
    profile = tmp_path / "config.yaml"
    profile.write_text(PROFILE.read_text())
    cluster.main([str(tmp_path / "bench"), str(profile), "--gpu-partition", "a100"])
    text = profile.read_text()
    assert text.replace(
        re.search(r"# BEGIN.*# END cluster-resources", text, re.S).group(0), ""
    ) == PROFILE.read_text().replace(
        re.search(r"# BEGIN.*# END cluster-resources", PROFILE.read_text(), re.S).group(0), ""
    )
    attack = yaml.safe_load(text)["set-resources"]["attack"]
    assert attack == {"mem_mb": attack["mem_mb"], "runtime": "10 * attempt", "slurm_partition": "a100"}
    assert job_mem_mb(attack["mem_mb"], encoder="uni", attempt=1) == 1500 + 2500


def job_mem_mb(expression: str, *, encoder: str, attempt: int) -> int:
    """What Snakemake makes of a profile's resource expression for one job."""
    return eval(expression, {"wildcards": SimpleNamespace(encoder=encoder), "attempt": attempt})


def test_gpu_jobs_are_sized_by_their_encoder():
    uni, vit_g = registry.get_spec("uni"), registry.get_spec("h_optimus_0")
    # float32 weights, twice (loaded and adopted), in 500 MB steps: 0.3 G values -> 2.3 GB -> 2500
    assert cluster.encoder_host_mb(uni) == 2500 and cluster.encoder_host_mb(vit_g) == 9000
    assert cluster.encoder_host_mb(registry.get_spec("demo_trained")) == cluster.MEM_STEP_MB
    unsized = custom_spec("mine", {"factory": "a:b", "input_px": 224, "embed_dim": 8, "readout": "output"})
    assert cluster.encoder_host_mb(unsized) == max(cluster.encoder_sizes_mb().values()) == 9000
    sized = custom_spec(
        "mine", {"factory": "a:b", "input_px": 224, "embed_dim": 8, "readout": "output", "n_params": 90_000_000}
    )
    sizes = cluster.encoder_sizes_mb([sized])
    assert sizes["mine"] == 1000 and set(sizes) == {*registry.ENCODERS, "mine"}
    expression = cluster.gpu_mem_expression(3000, sizes)
    assert job_mem_mb(expression, encoder="uni", attempt=2) == 2 * (3000 + 2500)
    assert job_mem_mb(expression, encoder="mine", attempt=1) == 4000
    assert job_mem_mb(expression, encoder="added_later", attempt=1) == 3000 + 9000  # the largest


def test_slurm_profile_sizes_every_rule_and_sends_gpu_rules_to_the_gpu_partition():
    profile = yaml.safe_load(PROFILE.read_text())
    assert profile["executor"] == "slurm" and profile["retries"] >= 1
    assert profile["slurm-status-command"] == "squeue"
    rules = set(
        re.findall(
            r"^(?:rule|checkpoint|use rule \w+ as) (\w+)",
            "\n".join(p.read_text() for p in (ROOT / "rules").glob("*.smk")),
            re.M,
        )
    )
    sized = profile["set-resources"]
    assert set(sized) <= rules and cluster.gpu_rules(ROOT / "rules") <= set(sized)
    assert not set(sized) & cluster.local_rules(ROOT / "Snakefile")  # they never reach SLURM
    for rule, resources in sized.items():
        assert "attempt" in str(resources["mem_mb"]) and "attempt" in str(resources["runtime"])  # retries grow them
        assert (resources.get("slurm_partition") == "gpu") == (rule in cluster.gpu_rules(ROOT / "rules"))
    # retries grow memory with the attempt number, as Snakemake evaluates the expression; GPU
    # jobs also with their encoder
    extract = str(sized["extract"]["mem_mb"])
    assert job_mem_mb(extract, encoder="uni", attempt=2) == 2 * job_mem_mb(extract, encoder="uni", attempt=1)
    assert job_mem_mb(extract, encoder="h_optimus_0", attempt=1) - job_mem_mb(extract, encoder="uni", attempt=1) == 6500


def test_a_killed_writers_debris_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "slide.zarr"
    debris_dir = tmp_path / ".slide.zarr.tmp-deadbeef"
    (debris_dir / "tiles").mkdir(parents=True)
    debris_file = tmp_path / ".slide.zarr.tmp-0badf00d"
    debris_file.write_text("half")
    neighbour = tmp_path / ".other.zarr.tmp-12345678"  # another output's temp: not ours to remove
    neighbour.mkdir()
    with stores.atomic_store(target, kind=stores.FEATURES, attrs={"slide_id": "s"}) as group:
        group.create_array("features", data=np.zeros((2, 3), np.float32))
    assert not debris_dir.exists() and not debris_file.exists() and neighbour.exists()
    assert stores.open_store(target, kind=stores.FEATURES)["features"].shape == (2, 3)
