"""Fault tolerance: kill the tiny run (SIGKILL, the whole process group) in the middle of a stage
(the demo cohort being written, MIL heads being trained, attack jobs mid-shard), resume, and check
that it finishes, nothing is corrupt, nothing finished is redone and no temporary debris is left.

Slow tier.
"""

import os
import signal
import subprocess
import time
from base64 import urlsafe_b64decode
from pathlib import Path

import pytest
import zarr
from helpers import snakemake_command
from small_tiny import write_small_tiny_config
from wsiattack import stores
from wsiattack.shards import partition

pytestmark = pytest.mark.slow
N_SLIDES, ATTACKS = 4, ("pgd", "noise")
N_SHARDS = len(partition([f"demo_{i:03d}" for i in range(N_SLIDES)], n_shards=4))  # the default shard count
N_ATTACK_JOBS = N_SHARDS * len(ATTACKS)


def finished_attack_stores(workdir: Path) -> list[Path]:
    """Finished per-shard attack outputs (a job mid-shard writes to a hidden temporary directory)."""
    return sorted((workdir / "results" / "attacks").glob("*/demo_trained/shard-*"))


def attack_is_half_done(workdir: Path) -> bool:
    return len(finished_attack_stores(workdir)) >= 2


def demo_cohort_is_being_written(workdir: Path) -> bool:
    """A slide (or its temporary file) is on disk and the sample sheet, written last, is not."""
    demo = workdir / "results" / "demo"
    return (demo / "slides").is_dir() and any((demo / "slides").iterdir()) and not (demo / "samples.csv").exists()


def mil_training_has_started(workdir: Path) -> bool:
    """A train_mil job is running (its log exists) and not every fold's head is written yet."""
    results = workdir / "results"
    started = list((results / "logs" / "train_mil").glob("*.log")) if (results / "logs" / "train_mil").is_dir() else []
    return bool(started) and len(list(results.glob("mil/*/*/fold*/model.safetensors"))) < 2


KILL_POINTS = {
    "demo_cohort": demo_cohort_is_being_written,
    "train_mil": mil_training_has_started,
    "attack": attack_is_half_done,
}


def run_until(workdir: Path, reached, *, timeout_s: float = 600) -> None:
    """Run the workflow and SIGKILL it (the scheduler and every running job, at once) once ``reached``."""
    process = subprocess.Popen(
        snakemake_command(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not reached(workdir):
            assert process.poll() is None, f"the run ended before it could be interrupted at {reached.__name__}"
            assert time.monotonic() < deadline, f"{reached.__name__} not reached in time"
            time.sleep(0.01)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def marked_incomplete(workdir: Path) -> set[Path]:
    """Outputs Snakemake marks incomplete (a job killed between its output's rename and Snakemake's
    bookkeeping): .snakemake/incomplete holds each path base64-encoded, long ones split into '@' parts."""
    marker_dir = workdir / ".snakemake" / "incomplete"
    marked = set()
    for marker in (m for m in marker_dir.rglob("*") if m.is_file()):
        encoded = "".join(part.removeprefix("@") for part in marker.relative_to(marker_dir).parts)
        marked.add(workdir / urlsafe_b64decode(encoded).decode())
    return marked


def output_mtimes(workdir: Path) -> dict[Path, int]:
    """Every finished output of the workflow (stores by their zarr.json) and its mtime."""
    results = workdir / "results"
    found = {}
    for path in results.rglob("*"):
        if path.name.startswith(".") or any(p.startswith(".") for p in path.relative_to(results).parts):
            continue
        if path.name == "zarr.json" and path.parent.suffix == ".zarr":
            found[path.parent] = path.stat().st_mtime_ns
        elif path.is_file() and ".zarr" not in str(path.relative_to(results)) and "logs" not in path.parts:
            found[path] = path.stat().st_mtime_ns
    return found


@pytest.mark.parametrize("stage", list(KILL_POINTS))
def test_killed_mid_stage_resumes_without_redoing_or_corrupting(tmp_path, stage):
    workdir = tmp_path / "run"
    workdir.mkdir()
    write_small_tiny_config(workdir / "config.yaml", n_slides=N_SLIDES, attacks=ATTACKS)

    run_until(workdir, KILL_POINTS[stage])
    incomplete = marked_incomplete(workdir)  # redone on resume (the profile sets rerun-incomplete)
    done_before = {path: mtime for path, mtime in output_mtimes(workdir).items() if path not in incomplete}
    if stage == "attack":
        assert 2 <= len(finished_attack_stores(workdir)) < N_ATTACK_JOBS

    # What a user does after a crash: release the lock of the dead run, then run again.
    subprocess.run(snakemake_command(workdir, "--unlock"), check=True, capture_output=True, timeout=120)
    resumed = subprocess.run(snakemake_command(workdir), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]

    done_after = output_mtimes(workdir)
    redone = [str(p) for p, mtime in done_before.items() if done_after.get(p) != mtime]
    assert not redone, f"finished outputs were redone: {redone}"
    assert len(finished_attack_stores(workdir)) == N_ATTACK_JOBS
    assert not list((workdir / "results").rglob(".*.tmp-*")), "debris of the killed jobs was left behind"
    for store_path in done_after:
        if store_path.suffix == ".zarr":  # every chunk of every store decodes
            group = zarr.open_group(store_path, mode="r")
            assert group.attrs["kind"] in (
                stores.TILES,
                stores.FEATURES,
                stores.ATTACK,
                stores.REEMBEDDED,
                stores.TILE_WEIGHTS,
            )
            for _, array in group.arrays():
                array[...]
    dry = subprocess.run(snakemake_command(workdir, "--dry-run"), capture_output=True, text=True, timeout=120)
    assert "Nothing to be done" in dry.stdout + dry.stderr
