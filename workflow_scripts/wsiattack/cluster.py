"""Cluster resource sizing from the `benchmark:` files of a finished run.

    python -m wsiattack.cluster results/benchmarks profiles/slurm/config.yaml

reads every results/benchmarks/<rule>/*.tsv, sizes each rule's memory and runtime from the worst
job it saw, and rewrites the `set-resources` block of the SLURM profile between its BEGIN/END
markers; the Snakefile's `localrules` never reach the cluster and are left out. Sizes are Python
expressions of `attempt`, so a job that SLURM kills for memory or time is retried (the profile's
`retries`) with twice, then three times, as much.

Most GPU jobs load an encoder (``encoder_rules``; not train_mil), and encoders differ 1 000-fold
in size (ViT-Tiny 1 M values, ViT-g 1.1 G): their memory is the rule's measured base plus the
job's encoder's weights on the host
(``encoder_host_mb``, from the parameter count of its spec), a lookup on ``wildcards.encoder``
in the expression. The rules' own ``mem_mb`` (used without a profile) is the same sum with a
fixed base. Torch-free: it runs where Snakemake builds the DAG.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from wsiattack.atomic import atomic_file
from wsiattack.encoders.registry import ENCODERS, EncoderSpec
from wsiattack.errors import ConfigError, StoreError, run_cli

BEGIN = "# BEGIN cluster-resources"
END = "# END cluster-resources"
MEM_HEADROOM = 1.5  # peak RSS varies with slide size and allocator; 1.5x covers the demo's spread
MEM_STEP_MB = 500
MEM_FLOOR_MB = 1000
RUNTIME_HEADROOM = 3.0  # queue nodes are often slower and busier than the node that measured
RUNTIME_FLOOR_MIN = 10  # below this, schedulers' granularity and job start-up dominate
# A GPU job's host memory besides its encoder's weights (the rules' default without a profile):
# torch, timm and the CUDA context (~1 GB host), one shard's stores and a slide's tiles.
GPU_JOB_BASE_MB = 2000
# Weights are float32 on the host before they move to the device; while loading, the checkpoint's
# own tensors (mmap'd pages, or a half-precision file being cast) sit beside them: two copies.
HOST_WEIGHT_COPIES = 2
BYTES_PER_VALUE = 4


@dataclass(frozen=True)
class RuleUsage:
    """The worst case over one rule's jobs."""

    rule: str
    n_jobs: int
    max_rss_mb: float
    max_wall_s: float


@dataclass(frozen=True)
class RuleResources:
    rule: str
    mem_mb: int  # for attempt 1
    runtime_min: int  # for attempt 1
    gpu: bool
    loads_encoder: bool = False  # memory grows with the job's encoder (``encoder_rules``)


def encoder_host_mb(spec: EncoderSpec) -> int:
    """Host memory an encoder's weights take while a job loads them, in MEM_STEP_MB steps; an
    encoder of unknown size (a custom one without ``n_params``) is sized as the largest known."""
    n_params = spec.n_params if spec.n_params is not None else max(s.n_params or 0 for s in ENCODERS.values())
    mb = n_params * BYTES_PER_VALUE * HOST_WEIGHT_COPIES / 2**20
    return math.ceil(mb / MEM_STEP_MB) * MEM_STEP_MB


def encoder_sizes_mb(custom: list[EncoderSpec] = ()) -> dict[str, int]:
    """``encoder_host_mb`` of every registry encoder and of the custom ones given, by name."""
    return {spec.name: encoder_host_mb(spec) for spec in sorted([*ENCODERS.values(), *custom], key=lambda s: s.name)}


def read_benchmarks(benchmarks_dir: Path) -> list[RuleUsage]:
    """Worst peak RSS and wall time per rule, from Snakemake's benchmark TSVs (one folder per rule)."""
    usage = []
    for rule_dir in sorted(p for p in Path(benchmarks_dir).iterdir() if p.is_dir()):
        rows = [row for tsv in sorted(rule_dir.glob("*.tsv")) for row in _tsv_rows(tsv)]
        if rows:
            usage.append(
                RuleUsage(
                    rule=rule_dir.name,
                    n_jobs=len(rows),
                    max_rss_mb=max(_number(row["max_rss"]) for row in rows),
                    max_wall_s=max(_number(row["s"]) for row in rows),
                )
            )
    if not usage:
        raise StoreError(f"{benchmarks_dir}: no benchmark files; run the workflow first")
    return usage


def _tsv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _number(text: str) -> float:
    return 0.0 if text in ("", "NA", "-") else float(text)


def gpu_rules(rules_dir: Path) -> set[str]:
    """Rules whose `resources:` declare gpu (read from rules/*.smk, where that is declared once)."""
    return _rules_declaring(rules_dir, r"^\s+gpu\s*=\s*[1-9]")


def encoder_rules(rules_dir: Path) -> set[str]:
    """Rules whose memory is sized by their encoder (``mem_mb=gpu_job_mem_mb``)."""
    return _rules_declaring(rules_dir, r"^\s+mem_mb\s*=\s*gpu_job_mem_mb\b")


def _rules_declaring(rules_dir: Path, line_pattern: str) -> set[str]:
    """Rules of rules/*.smk with a line matching ``line_pattern``, and the rules made from them by
    ``use rule X as Y`` (which inherit their resources)."""
    found, derived = set(), []
    for smk in Path(rules_dir).glob("*.smk"):
        text = smk.read_text()
        for match in re.finditer(r"^rule (\w+):\n(.*?)(?=^rule |^use rule |\Z)", text, re.M | re.S):
            if re.search(line_pattern, match.group(2), re.M):
                found.add(match.group(1))
        derived += re.findall(r"^use rule (\w+) as (\w+)", text, re.M)
    return found | {new for base, new in derived if base in found}


def local_rules(snakefile: Path) -> set[str]:
    """The rules of the Snakefile's ``localrules:`` block (one name per line, as it is written there)."""
    match = re.search(r"^localrules:\n((?:[ \t]+\w+,?[ \t]*\n)+)", Path(snakefile).read_text(), re.M)
    return set(re.findall(r"\w+", match.group(1))) if match else set()


def size_rule(usage: RuleUsage, *, gpu: bool, loads_encoder: bool = False) -> RuleResources:
    mem_mb = max(MEM_FLOOR_MB, math.ceil(usage.max_rss_mb * MEM_HEADROOM / MEM_STEP_MB) * MEM_STEP_MB)
    runtime_min = max(RUNTIME_FLOOR_MIN, math.ceil(usage.max_wall_s * RUNTIME_HEADROOM / 60))
    return RuleResources(rule=usage.rule, mem_mb=mem_mb, runtime_min=runtime_min, gpu=gpu, loads_encoder=loads_encoder)


def gpu_mem_expression(base_mb: int, sizes_mb: dict[str, int]) -> str:
    """``(base + the job's encoder's weights) * attempt`` as Snakemake evaluates it per job; an
    encoder missing from ``sizes_mb`` (added to the config later) gets the largest size."""
    lookup = json.dumps(sizes_mb, separators=(",", ":"))  # double quotes: the YAML scalar is single-quoted
    return f"({base_mb} + {lookup}.get(wildcards.encoder, {max(sizes_mb.values())})) * attempt"


def render_set_resources(
    sized: list[RuleResources], *, gpu_partition: str, encoder_mb: dict[str, int], indent: str = "  "
) -> str:
    lines = []
    for res in sized:
        lines.append(f"{indent}{res.rule}:")
        if res.loads_encoder:  # quoted: the dict's ": " would otherwise end the YAML scalar
            lines.append(f"{indent}  mem_mb: '{gpu_mem_expression(res.mem_mb, encoder_mb)}'")
        else:
            lines.append(f"{indent}  mem_mb: {res.mem_mb} * attempt")
        lines.append(f"{indent}  runtime: {res.runtime_min} * attempt")
        if res.gpu:
            lines.append(f"{indent}  slurm_partition: {gpu_partition}")
    return "\n".join(lines)


def replace_block(profile_text: str, block: str) -> str:
    """Put `block` between the profile's BEGIN/END markers, keeping everything else."""
    pattern = re.compile(rf"^(?P<indent>[ \t]*){re.escape(BEGIN)}\n.*?^[ \t]*{re.escape(END)}", re.M | re.S)
    match = pattern.search(profile_text)
    if match is None:
        raise ConfigError(f"the profile has no '{BEGIN}' ... '{END}' markers")
    indent = match.group("indent")
    replacement = f"{indent}{BEGIN}\n{block}\n{indent}{END}"
    return profile_text[: match.start()] + replacement + profile_text[match.end() :]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("benchmarks", type=Path, help="results/benchmarks of a finished run")
    parser.add_argument("profile", type=Path, help="profile config.yaml to update (e.g. profiles/slurm/config.yaml)")
    parser.add_argument("--rules-dir", type=Path, default=Path(__file__).resolve().parents[2] / "rules")
    parser.add_argument("--snakefile", type=Path, default=Path(__file__).resolve().parents[2] / "Snakefile")
    parser.add_argument("--gpu-partition", default="gpu")
    parser.add_argument("--configfile", type=Path, help="workflow config whose custom_encoders are sized too")
    args = parser.parse_args(argv)
    gpu, local, by_encoder = gpu_rules(args.rules_dir), local_rules(args.snakefile), encoder_rules(args.rules_dir)
    sized = [
        size_rule(u, gpu=u.rule in gpu, loads_encoder=u.rule in by_encoder)
        for u in read_benchmarks(args.benchmarks)
        if u.rule not in local
    ]
    encoder_mb = encoder_sizes_mb(_custom_encoders(args.configfile) if args.configfile else [])
    block = render_set_resources(sized, gpu_partition=args.gpu_partition, encoder_mb=encoder_mb)
    text = replace_block(args.profile.read_text(), block)
    with atomic_file(args.profile) as tmp:
        Path(tmp).write_text(text)
    for res in sized:
        extra = ("GPU" if res.gpu else "") + (", + the encoder's weights" if res.loads_encoder else "")
        print(f"{res.rule:14s} mem_mb={res.mem_mb:6d}  runtime={res.runtime_min:4d} min  {extra}")


def _custom_encoders(configfile: Path) -> list[EncoderSpec]:
    import yaml

    from wsiattack.encoders.custom import custom_spec

    config = yaml.safe_load(configfile.read_text()) or {}
    return [custom_spec(name, mapping) for name, mapping in (config.get("custom_encoders") or {}).items()]


if __name__ == "__main__":
    run_cli(main)
