"""What the tests share: the repository root and one way to run the workflow through Snakemake's CLI."""

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def snakemake_command(
    workdir: Path,
    *args: str,
    config: Path | None = None,
    overlays: Sequence[Path] = (),
    cores: int | None = 2,
    gpu_tokens: int | None = 2,
) -> list[str]:
    """``snakemake ARGS`` on this repository's Snakefile in ``workdir`` with ``config`` (default
    ``workdir/config.yaml``) and then ``overlays`` merged onto it key by key. gpu_tokens=2: on a
    CPU-only machine the GPU token must not serialise the torch jobs; None leaves it to the profile."""
    command = [sys.executable, "-m", "snakemake", *args, "-s", str(ROOT / "Snakefile"), "--directory", str(workdir)]
    configs = [config or workdir / "config.yaml", *overlays]
    command += ["--configfile", *map(str, configs)]
    command += [] if cores is None else ["--cores", str(cores)]  # None: the profile's
    return command + ([] if gpu_tokens is None else ["--resources", f"gpu={gpu_tokens}"])


def run_snakemake(workdir: Path, *args: str, timeout_s: float = 900, **options) -> subprocess.CompletedProcess:
    return subprocess.run(
        snakemake_command(workdir, *args, **options), capture_output=True, text=True, timeout=timeout_s, cwd=workdir
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """The run succeeded; otherwise fail with the ends of its output."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result
