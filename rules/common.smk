# Shared by all rules: the library on the path, the validated config, the sample sheet, and the
# per-rule specs that Snakemake tracks as params (functions of wildcards only).
import functools
import math
import os
import re
import sys
from pathlib import Path

# The Snakefile's own imports: the library is importable without installing it. Rule scripts find
# it without help: Snakemake puts a script's own directory (workflow_scripts/) on its sys.path,
# in every environment (conda, cluster).
sys.path.insert(0, str(Path(workflow.basedir) / "workflow_scripts"))

from wsiattack import config as wsiconfig
from wsiattack.cluster import GPU_JOB_BASE_MB, encoder_host_mb
from wsiattack.attacks.params import is_derived, learning_spec, uses_mil_head
from wsiattack.defences.params import ATTACKER_KEYS as DEFENCE_ATTACKER_KEYS
from wsiattack.defences.params import MODES as DEFENCE_MODES
from wsiattack.defences.params import defence_pairs, is_tile_defence
from wsiattack.encoders.custom import resolve_spec
from wsiattack.names import NAME_PATTERN
from wsiattack.samples import read_samples
from wsiattack.shards import SHARD_PATTERN, partition

CONFIG = wsiconfig.validate_config(config)
USES_DEMO = CONFIG["samples"] == wsiconfig.DEMO_SAMPLES
ENCODERS = CONFIG["encoders"]
ATTACKS = list(CONFIG["attacks"])
# Which rules make an attack's stores (rules/attack.smk): perturb + re-embed in one job (direct),
# or perturbed on a surrogate / shuffled from a source, then re-embedded per encoder (derived).
DERIVED_ATTACKS = [name for name in ATTACKS if is_derived(CONFIG["attacks"][name])]
DIRECT_ATTACKS = [name for name in ATTACKS if name not in DERIVED_ATTACKS]
SHUFFLED_ATTACKS = [name for name in DERIVED_ATTACKS if CONFIG["attacks"][name]["method"] == "shuffled"]
UNIVERSAL_ATTACKS = [name for name in DERIVED_ATTACKS if CONFIG["attacks"][name]["method"] == "universal"]
SURROGATE_ATTACKS = [name for name in DERIVED_ATTACKS if name not in SHUFFLED_ATTACKS + UNIVERSAL_ATTACKS]
MIL_MODELS = CONFIG["mil"]["models"]
FOLDS = list(range(CONFIG["mil"]["folds"]))

NAME = NAME_PATTERN


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


def names_regex(names):
    """A wildcard constraint that matches exactly these names (none: matches nothing)."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


def log_path(rule, *wildcard_names):
    parts = "_".join(f"{{{w}}}" for w in wildcard_names) or rule
    return f"results/logs/{rule}/{parts}.log"


def benchmark_path(rule, *wildcard_names):
    parts = "_".join(f"{{{w}}}" for w in wildcard_names) or rule
    return f"results/benchmarks/{rule}/{parts}.tsv"


def gpu_job_mem_mb(wildcards, attempt):
    """A GPU job's memory: a fixed base plus its encoder's weights on the host, grown on retries
    (profiles/slurm replaces the base with a measured one: wsiattack.cluster)."""
    encoder = resolve_spec(wildcards.encoder, custom=CONFIG["custom_encoders"].get(wildcards.encoder))
    return (GPU_JOB_BASE_MB + encoder_host_mb(encoder)) * attempt


# Input functions of the stage rules (Snakemake lint: functions live here, rules in their files).
def slide_mpp_overrides(wildcards):
    """The sample sheet's mpp of the shard's slides that have one (part of the tiling spec)."""
    sheet = samples()
    if "mpp" not in sheet.columns:
        return {}
    mpps = {slide: float(sheet.loc[slide, "mpp"]) for slide in shard_slides(wildcards)}
    return {slide: mpp for slide, mpp in mpps.items() if not math.isnan(mpp)}


def selection_features(wildcards):
    """Clean features, for the selections that rank tiles by them and the gray-box attacks' bag."""
    entry = CONFIG["attacks"][wildcards.attack]
    if entry["selection"] in ("centrality", "vulnerability") or uses_mil_head(entry):
        return f"results/features/{wildcards.encoder}/{wildcards.shard}"
    return []


def oracle_splits(wildcards):
    return "results/splits.csv" if uses_mil_head(CONFIG["attacks"][wildcards.attack]) else []


def oracle_heads(wildcards):
    """Every fold's head of the attack's MIL model on this encoder (gray-box attacks only)."""
    entry = CONFIG["attacks"][wildcards.attack]
    if not uses_mil_head(entry):
        return []
    return expand(
        "results/mil/{encoder}/{mil}/fold{fold}/model.safetensors",
        encoder=wildcards.encoder,
        mil=entry["mil"],
        fold=FOLDS,
    )


def attack_dir(attack, encoder, shard):
    """Where the perturbed tiles that ``encoder`` re-embeds for ``attack`` are: a transfer attack's
    (and its shuffled control's) on its surrogate, every other attack's on the encoder itself."""
    surrogate = CONFIG["attacks"][attack].get("surrogate")
    return f"results/attacks/{attack}/{surrogate or encoder}/{shard}"


def perturbing_encoders(attack):
    """The encoders whose gradients make an attack's tiles: its surrogate, or each evaluated encoder."""
    surrogate = CONFIG["attacks"][attack].get("surrogate")
    return [surrogate] if surrogate else ENCODERS


def pattern_owner(attack):
    """The universal attack whose patterns ``attack`` applies: the first with the same learning
    settings (``params.learning_spec``), so entries that differ only in budget share one set."""
    own = learning_spec(CONFIG["attacks"][attack])
    return next(name for name in UNIVERSAL_ATTACKS if learning_spec(CONFIG["attacks"][name]) == own)


PATTERN_OWNERS = sorted({pattern_owner(name) for name in UNIVERSAL_ATTACKS})


def universal_patterns(wildcards):
    """Every fold's universal pattern of the attack on this encoder (the script picks each slide's)."""
    return expand(
        "results/universal/{attack}/{encoder}/fold{fold}.zarr",
        attack=pattern_owner(wildcards.attack),
        encoder=wildcards.encoder,
        fold=FOLDS,
    )


def derived_attack_dir(wildcards):
    return attack_dir(wildcards.attack, wildcards.encoder, wildcards.shard)


def shuffle_source(wildcards):
    """The source attack's stores, perturbed with the same encoder (the surrogate, if any)."""
    source = CONFIG["attacks"][wildcards.attack]["source"]
    return f"results/attacks/{source}/{wildcards.encoder}/{wildcards.shard}"


def clean_features(wildcards):
    return per_shard("results/features/{encoder}/{shard}", encoder=wildcards.encoder)


def example_slides(wildcards):
    """The first few slides, for the example-tile figure."""
    return slide_ids()[: CONFIG["evaluation"]["n_example_tiles"]]


def example_shards(wildcards):
    """The shards that hold the example slides."""
    wanted = set(example_slides(wildcards))
    return [shard for shard, members in shards().items() if wanted.intersection(members)]


# The backdoor branch (rules/backdoor.smk), when the config has a backdoor block.
BACKDOOR = CONFIG.get("backdoor")
BACKDOOR_SHOTS = wsiconfig.backdoor_shots(CONFIG) if BACKDOOR else []
BACKDOOR_DIR = "results/backdoor/{encoder}/{mil}"


def backdoor_results(suffix):
    """Every backdoor job's output with ``suffix`` (.csv, .zarr): the clean head per encoder and
    shots setting, and each (trigger, target) on top of it."""
    if not BACKDOOR:
        return []
    mil = BACKDOOR["mil"]
    clean = expand(f"{BACKDOOR_DIR}/clean/shots_{{shots}}{suffix}", encoder=ENCODERS, mil=mil, shots=BACKDOOR_SHOTS)
    poisoned = expand(
        f"{BACKDOOR_DIR}/{{trigger}}/{{target}}/shots_{{shots}}{suffix}",
        encoder=ENCODERS,
        mil=mil,
        trigger=BACKDOOR["triggers"],
        target=BACKDOOR["targets"],
        shots=BACKDOOR_SHOTS,
    )
    return clean + poisoned


def backdoor_example(wildcards):
    """The store whose example triggered tile is drawn: the first trigger, target and shots setting."""
    trigger, target, shots = BACKDOOR["triggers"][0], BACKDOOR["targets"][0], BACKDOOR_SHOTS[0]
    return f"results/backdoor/{wildcards.encoder}/{BACKDOOR['mil']}/{trigger}/{target}/shots_{shots}.zarr"


# The defences branch (rules/defence.smk), when the config has a defences block.
DEFENCES = CONFIG.get("defences")
DEFENCE_NAMES = list(DEFENCES["defences"]) if DEFENCES else []
TILE_DEFENCE_NAMES = [name for name in DEFENCE_NAMES if is_tile_defence(DEFENCES["defences"][name])]
DEFENCE_PAIRS = defence_pairs(DEFENCES, attacks=CONFIG["attacks"]) if DEFENCES else []
DEFENCE_ATTACKS = DEFENCES["attacks"] if DEFENCES else []


def defence_spec(name, *, attacker=False):
    """The defence entry a job depends on: the adaptive attacker's settings for attack jobs only,
    so that editing eot_samples re-runs attacks, not the defended extraction."""
    entry = {"name": name, **DEFENCES["defences"][name]}
    return entry if attacker else {key: value for key, value in entry.items() if key not in DEFENCE_ATTACKER_KEYS}


def _tile_defence(wildcards):
    return wildcards.defence in TILE_DEFENCE_NAMES


def defended_features(wildcards):
    """Every shard's clean features as the defended pipeline computes them: through a tile
    defence, or the plain ones for a head defence."""
    if _tile_defence(wildcards):
        return per_shard("results/defences/features/{defence}/{encoder}/{shard}", **dict(wildcards.items()))
    return clean_features(wildcards)


def defended_attack_features(wildcards):
    """The shard's features the adaptive attack reads: the attack's own needs (selection, gray-box
    bag) and the detector's (knn_filter), as the defended pipeline computes them."""
    entry = CONFIG["attacks"][wildcards.attack]
    needed = entry["selection"] in ("centrality", "vulnerability") or uses_mil_head(entry)
    if not needed and DEFENCES["defences"][wildcards.defence]["kind"] != "knn_filter":
        return []
    if _tile_defence(wildcards):
        return "results/defences/features/{defence}/{encoder}/{shard}".format(**dict(wildcards.items()))
    return f"results/features/{wildcards.encoder}/{wildcards.shard}"


def defended_reembedded(wildcards):
    """The attacked rows a defended evaluation swaps in: the adaptive attack's; without
    adaptation, the attack's own tiles re-embedded through a tile defence, or its own rows."""
    if wildcards.mode == "adaptive" or _tile_defence(wildcards):
        return per_shard(
            "results/defences/reembedded/{defence}/{mode}/{attack}/{encoder}/{shard}", **dict(wildcards.items())
        )
    return per_shard(
        "results/reembedded/{attack}/{encoder}/{shard}", attack=wildcards.attack, encoder=wildcards.encoder
    )


def defence_evaluations():
    return [
        f"results/defences/eval/{encoder}/{mil}/{defence}/{mode}/{attack}.csv"
        for encoder in ENCODERS
        for mil in MIL_MODELS
        for defence, attack in DEFENCE_PAIRS
        for mode in DEFENCE_MODES
    ]
