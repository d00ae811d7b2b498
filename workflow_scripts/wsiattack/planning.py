"""Plan a large study before running it: how many jobs, how long Snakemake takes to build the DAG,
and how much memory it needs, for N slides x E encoders x A attacks.

    python -m wsiattack.planning --slides 10000 --encoders 10 --attacks 50 --shards 100

(``make plan-study`` runs that.) It writes, in a scratch directory, a sample sheet of N slides
(symbolic links to one file: a dry run never opens a slide), a config with E registry encoders
(pointed at a placeholder local checkpoint, as a site with downloaded weights would be; beyond
the registry's, copies of a torchvision factory) and A PGD entries, then times
``snakemake --dry-run`` on it and reads its peak RSS.

With ``--pilot results/`` it also estimates device-hours per stage: it fits each GPU rule's
job wall time (benchmark files) against the work the job did (tiles embedded; gradient
evaluations of attacked tiles, from the attack stores) over the pilot's shards, which gives a
start-up per job and a cost per unit, and scales both to the study. Run the pilot on the
study's hardware with its encoders: the demo on a CPU says nothing about a ViT-g on a GPU.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from wsiattack.encoders import preflight, registry
from wsiattack.errors import run_cli

ROOT = Path(__file__).resolve().parents[2]


def usable_registry_encoders() -> list[str]:
    """Registry encoders whose loader is installed here (the others cannot pass preflight)."""
    return [name for name, spec in registry.ENCODERS.items() if preflight.missing_requirement(spec) is None]


def study_config(*, n_encoders: int, n_attacks: int, n_shards: int, samples: str, checkpoint: str) -> dict:
    names = usable_registry_encoders()[:n_encoders]
    custom = {
        f"custom_{i}": {
            "factory": "torchvision.models:resnet18",
            "input_px": 224,
            "embed_dim": 1000,
            "readout": "output",
        }
        for i in range(n_encoders - len(names))
    }
    return {
        "samples": samples,
        "classes": ["normal", "tumor"],
        "shards": n_shards,
        "encoders": [*names, *custom],
        "encoder_weights": {name: checkpoint for name in names if name != "demo"},
        "custom_encoders": custom,
        "attacks": {
            f"pgd_{i:02d}": {"method": "pgd", "eps": f"{1 + i % 16}/255", "steps": 10, "seed": i}
            for i in range(n_attacks)
        },
    }


def write_study(workdir: Path, *, n_slides: int, n_encoders: int, n_attacks: int, n_shards: int) -> Path:
    """Sample sheet, slide links and config of the study in ``workdir``; returns the config path."""
    slides = workdir / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    target = workdir / "placeholder.tiff"
    target.write_bytes(b"a dry run never opens a slide")
    rows = ["slide_id,path,label"]
    for i in range(n_slides):
        link = slides / f"slide_{i:06d}.tiff"
        if not link.exists():
            link.symlink_to(target)
        rows.append(f"slide_{i:06d},slides/{link.name},{('normal', 'tumor')[i % 2]}")
    (workdir / "samples.csv").write_text("\n".join(rows) + "\n")
    checkpoint = workdir / "weights.safetensors"
    checkpoint.write_bytes(b"placeholder: a dry run never loads weights")
    config = study_config(
        n_encoders=n_encoders, n_attacks=n_attacks, n_shards=n_shards, samples="samples.csv", checkpoint=str(checkpoint)
    )
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def dry_run(workdir: Path, config: Path) -> dict:
    """Jobs per rule, DAG build wall time and peak RSS of ``snakemake --dry-run``."""
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--dry-run",
        "-s",
        str(ROOT / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(config),
        "--cores",
        "1",
    ]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"dry run failed:\n{result.stderr[-3000:]}")
    out = result.stdout + result.stderr
    table = out[out.index("Job stats:") :].split("\n\n")[0].splitlines()[3:]
    jobs = {rule: int(count) for rule, count in (line.split() for line in table if re.match(r"^\w+\s+\d+$", line))}
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # kB on Linux
    return {"jobs": jobs, "dag_build_s": round(seconds, 1), "peak_rss_mb": round(peak_rss_mb)}


def _wall_s(benchmark: Path) -> float:
    return float(pd.read_csv(benchmark, sep="\t")["s"].iloc[0])


def _fit_start_up(rows: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (start-up s, s per unit) of job wall time against work units, over jobs of
    different sizes (shards differ in size). With one size only, or when the jobs' times do not
    grow with their work (start-up dominates and timing noise tilts the line: a slope <= 0 or a
    negative start-up), the two cannot be told apart: start-up 0 and the mean s per unit, which
    over-estimates the per-unit cost (a safe side for planning)."""
    units, walls = np.array([r[0] for r in rows], dtype=float), np.array([r[1] for r in rows], dtype=float)
    ratio = (0.0, float(walls.sum() / units.sum()))
    if len(set(units)) < 2:
        return ratio
    slope, intercept = np.polyfit(units, walls, 1)
    return ratio if slope <= 0 or intercept < 0 else (float(intercept), float(slope))


def pilot_costs(results: Path, *, encoder: str) -> dict:
    """Per-job start-up and per-tile costs of a finished run's ``encoder`` jobs, from their
    benchmark files and stores: extraction s/tile, and attack s per gradient evaluation of a tile
    (the attack's unit of work; re-embedding k tiles is folded into it)."""
    from wsiattack import stores  # zarr: only the estimate needs it

    extract_rows, attack_rows, tiles_per_slide, evals_per_tile = [], [], [], []
    for shard_dir in sorted((results / "features" / encoder).glob("shard-*")):
        n = [stores.open_store(p, kind=stores.FEATURES)["features"].shape[0] for p in stores.slide_stores([shard_dir])]
        tiles_per_slide += n
        extract_rows.append((sum(n), _wall_s(results / "benchmarks" / "extract" / f"{encoder}_{shard_dir.name}.tsv")))
    for shard_dir in sorted((results / "attacks").glob(f"*/{encoder}/shard-*")):
        attack = shard_dir.parents[1].name
        evals = [stores.open_store(p, kind=stores.ATTACK)["iterations"][...] for p in stores.slide_stores([shard_dir])]
        if (total := int(sum(e.sum() for e in evals))) == 0:
            continue  # the noise control: no gradient
        evals_per_tile += [float(e.mean()) for e in evals if len(e)]
        attack_rows.append(
            (total, _wall_s(results / "benchmarks" / "attack" / f"{attack}_{encoder}_{shard_dir.name}.tsv"))
        )
    if not extract_rows or not attack_rows:
        raise SystemExit(f"{results}: no finished extract and gradient attack jobs of encoder {encoder!r} to measure")
    extract_start_s, extract_s_per_tile = _fit_start_up(extract_rows)
    attack_start_s, attack_s_per_eval = _fit_start_up(attack_rows)
    return {
        "encoder": encoder,
        "extract_jobs": len(extract_rows),
        "attack_jobs": len(attack_rows),
        "extract_start_up_s": extract_start_s,
        "extract_s_per_tile": extract_s_per_tile,
        "attack_start_up_s": attack_start_s,
        "attack_s_per_gradient_evaluation": attack_s_per_eval,
        "tiles_per_slide": float(np.mean(tiles_per_slide)),
        "gradient_evaluations_per_tile": float(np.mean(evals_per_tile)),
    }


def estimate_hours(
    costs: dict,
    *,
    n_slides: int,
    n_encoders: int,
    n_attacks: int,
    n_shards: int,
    fraction: float,
    tiles_per_slide: float | None = None,
    evaluations_per_tile: float | None = None,
) -> dict:
    """Device-hours per stage for a study, scaled from one encoder's pilot costs (each of the
    study's encoders assumed as costly as the pilot's: run one pilot per encoder to do better)."""
    tiles = tiles_per_slide or costs["tiles_per_slide"]
    evals = evaluations_per_tile or costs["gradient_evaluations_per_tile"]
    k = max(1.0, round(fraction * tiles))
    extract_s = n_encoders * (n_slides * tiles * costs["extract_s_per_tile"] + n_shards * costs["extract_start_up_s"])
    attack_s = (
        n_encoders
        * n_attacks
        * (n_slides * k * evals * costs["attack_s_per_gradient_evaluation"] + n_shards * costs["attack_start_up_s"])
    )
    return {
        "extract_hours": extract_s / 3600,
        "attack_hours": attack_s / 3600,
        "attacked_tiles_per_slide": k,
        "tiles_per_slide": tiles,
        "gradient_evaluations_per_tile": evals,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=10_000)
    parser.add_argument("--encoders", type=int, default=10)
    parser.add_argument("--attacks", type=int, default=50)
    parser.add_argument(
        "--shards", type=int, default=100, help="the config's shards (slides per GPU job = slides / shards)"
    )
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument(
        "--pilot", type=Path, help="a finished run's results/: scale its measured per-tile costs to the study"
    )
    parser.add_argument("--pilot-encoder", default="demo", help="the pilot's encoder to measure (default: demo)")
    parser.add_argument(
        "--fraction", type=float, default=0.001, help="attacked share of each slide's tiles (default 0.001)"
    )
    parser.add_argument("--tiles-per-slide", type=float, help="the study's mean tiles per slide (default: the pilot's)")
    parser.add_argument("--no-dry-run", action="store_true", help="only the estimate")
    args = parser.parse_args(argv)
    if args.pilot:
        costs = pilot_costs(args.pilot, encoder=args.pilot_encoder)
        hours = estimate_hours(
            costs,
            n_slides=args.slides,
            n_encoders=args.encoders,
            n_attacks=args.attacks,
            n_shards=args.shards,
            fraction=args.fraction,
            tiles_per_slide=args.tiles_per_slide,
        )
        print(json.dumps({"pilot": costs, "estimate": hours}, indent=1))
        print(
            f"ESTIMATE slides={args.slides} encoders={args.encoders} attacks={args.attacks} extract_hours={hours['extract_hours']:.1f} attack_hours={hours['attack_hours']:.1f}"
        )
    if args.no_dry_run:
        return {}
    with tempfile.TemporaryDirectory(prefix="wsiattack-plan-") as scratch:
        workdir = args.workdir or Path(scratch)
        config = write_study(
            workdir, n_slides=args.slides, n_encoders=args.encoders, n_attacks=args.attacks, n_shards=args.shards
        )
        report = {
            "slides": args.slides,
            "encoders": args.encoders,
            "attacks": args.attacks,
            "shards": args.shards,
            **dry_run(workdir, config),
        }
    total = report["jobs"].get("total")
    print(json.dumps(report, indent=1))
    print(
        f"RESULT slides={args.slides} encoders={args.encoders} attacks={args.attacks} shards={args.shards} jobs={total} dag_build_s={report['dag_build_s']} peak_rss_mb={report['peak_rss_mb']}"
    )
    return report


if __name__ == "__main__":
    run_cli(main)
