"""Plan a large study before running it: how many jobs, how long Snakemake takes to build the DAG,
and how much memory it needs, for N slides x E encoders x A attacks.

    python -m wsiattack.planning --slides 10000 --encoders 10 --attacks 50 --shards 100

(``make plan-study`` runs that.) It writes, in a scratch directory, a sample sheet of N slides
(symbolic links to one file: a dry run never opens a slide), a config with E registry encoders
(pointed at a placeholder local checkpoint, as a site with downloaded weights would be; beyond
the registry's, copies of a torchvision factory) and A PGD entries, then times
``snakemake --dry-run`` on it and reads its peak RSS.
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

import yaml

from wsiattack.encoders import registry

ROOT = Path(__file__).resolve().parents[2]


def usable_registry_encoders() -> list[str]:
    """Registry encoders whose loader is installed here (the others cannot pass preflight)."""
    return [name for name, spec in registry.ENCODERS.items() if registry.missing_requirement(spec) is None]


def study_config(*, n_encoders: int, n_attacks: int, n_shards: int, samples: str, checkpoint: str) -> dict:
    names = usable_registry_encoders()[:n_encoders]
    custom = {f"custom_{i}": {"factory": "torchvision.models:resnet18", "input_px": 224, "embed_dim": 1000, "readout": "output"} for i in range(n_encoders - len(names))}
    return {
        "samples": samples,
        "classes": ["normal", "tumor"],
        "shards": n_shards,
        "encoders": [*names, *custom],
        "encoder_weights": {name: checkpoint for name in names if name != "demo"},
        "custom_encoders": custom,
        "attacks": {f"pgd_{i:02d}": {"method": "pgd", "eps": f"{1 + i % 16}/255", "steps": 10, "seed": i} for i in range(n_attacks)},
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
    config = study_config(n_encoders=n_encoders, n_attacks=n_attacks, n_shards=n_shards, samples="samples.csv", checkpoint=str(checkpoint))
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def dry_run(workdir: Path, config: Path) -> dict:
    """Jobs per rule, DAG build wall time and peak RSS of ``snakemake --dry-run``."""
    command = [sys.executable, "-m", "snakemake", "--dry-run", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir), "--configfile", str(config), "--cores", "1"]
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=10_000)
    parser.add_argument("--encoders", type=int, default=10)
    parser.add_argument("--attacks", type=int, default=50)
    parser.add_argument("--shards", type=int, default=100, help="the config's shards (slides per GPU job = slides / shards)")
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wsiattack-plan-") as scratch:
        workdir = args.workdir or Path(scratch)
        config = write_study(workdir, n_slides=args.slides, n_encoders=args.encoders, n_attacks=args.attacks, n_shards=args.shards)
        report = {"slides": args.slides, "encoders": args.encoders, "attacks": args.attacks, "shards": args.shards, **dry_run(workdir, config)}
    total = report["jobs"].get("total")
    print(json.dumps(report, indent=1))
    print(f"RESULT slides={args.slides} encoders={args.encoders} attacks={args.attacks} shards={args.shards} jobs={total} dag_build_s={report['dag_build_s']} peak_rss_mb={report['peak_rss_mb']}")
    return report


if __name__ == "__main__":
    main()
