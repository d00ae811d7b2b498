# Shared by all rules: the library on the path, the validated config, the sample sheet, and the
# per-rule specs that Snakemake tracks as params (functions of wildcards only).
import functools
import os
import sys
from pathlib import Path

LIBRARY = str(Path(workflow.basedir) / "workflow_scripts")
sys.path.insert(0, LIBRARY)
# Jobs run scripts in fresh interpreters (and, with --sdm conda, in per-rule envs where the
# library is not installed): they find it through PYTHONPATH.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (LIBRARY, os.environ.get("PYTHONPATH")) if p)

from wsiattack import config as wsiconfig
from wsiattack.samples import read_samples
from wsiattack.shards import SHARD_PATTERN, partition

CONFIG = wsiconfig.validate_config(config)
USES_DEMO = CONFIG["samples"] == wsiconfig.DEMO_SAMPLES
ENCODERS = CONFIG["encoders"]
ATTACKS = list(CONFIG["attacks"])
MIL_MODELS = CONFIG["mil"]["models"]
FOLDS = list(range(CONFIG["mil"]["folds"]))

NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"


wildcard_constraints:
    slide=NAME,
    encoder=NAME,
    attack=NAME,
    mil=NAME,
    fold=r"\d+",
    shard=SHARD_PATTERN,


@functools.cache
def _read_samples(path, mtime_ns):
    return read_samples(path, classes=CONFIG["classes"], base_dir=Path(path).parent)


@functools.cache
def _partition(path, mtime_ns):
    return partition(list(_read_samples(path, mtime_ns).index), n_shards=CONFIG["shards"])


def _sheet_key():
    """(path, mtime) of the sample sheet, once the demo cohort exists when the demo is used:
    the cache key of what is read from the sheet (input functions run for every job)."""
    if USES_DEMO:
        checkpoints.demo_cohort.get()
    path = CONFIG["samples"]
    return path, os.stat(path).st_mtime_ns


def samples():
    """The validated sample sheet."""
    return _read_samples(*_sheet_key())


def slide_ids():
    return list(samples().index)


def shards():
    """Shard -> its slides (``wsiattack.shards``): the GPU rules run one job per shard."""
    return _partition(*_sheet_key())


def shard_slides(wildcards):
    return shards()[wildcards.shard]


def per_shard(pattern, **wildcards):
    """``pattern`` (with ``{shard}``) for every shard of the cohort."""
    return expand(pattern, shard=list(shards()), **wildcards)


if not USES_DEMO:
    samples()  # a bad sheet fails at start-up, naming the row, before any job runs


def spec(value):
    """Sorted JSON of a spec: the form Snakemake stores and compares to decide re-runs."""
    return wsiconfig.spec_json(value)


def log_path(rule, *wildcard_names):
    parts = "_".join(f"{{{w}}}" for w in wildcard_names) or rule
    return f"results/logs/{rule}/{parts}.log"


def benchmark_path(rule, *wildcard_names):
    parts = "_".join(f"{{{w}}}" for w in wildcard_names) or rule
    return f"results/benchmarks/{rule}/{parts}.tsv"
