"""Benchmark: host memory a GPU job's encoder takes, measured against ``cluster.encoder_host_mb``.

    cd /work/main && .venv/bin/python tests/benchmarks/bench_encoder_memory.py [--encoders demo uni] [--dtype float32]

For each encoder, writes a checkpoint of its real architecture with random weights (``--dtype``:
as published hubs ship them, float32, or half precision) to a temporary safetensors file, then
in fresh processes measures the peak RSS of (a) importing what a GPU job imports and (b) that
plus ``build_encoder(name, checkpoint=...)`` (weights read, adopted, cast to float32, hashed),
and reports (b) − (a) next to the estimate the rules and the SLURM profile add to a GPU job's
memory. The estimate should be at or above the measured figure, and not far above it.

Not collected by pytest (not named test_*).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from wsiattack import cluster
from wsiattack.encoders.registry import get_spec


def write_checkpoint(name: str, path: Path, *, dtype: str) -> None:
    import torch
    from safetensors.torch import save_file
    from wsiattack.encoders.model import build_architecture

    with torch.device("cpu"):
        model = build_architecture(get_spec(name))
    save_file({k: v.to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()}, str(path))


def peak_rss_mb(*args: str) -> float:
    env = os.environ | {"WSIATTACK_CACHE_DIR": tempfile.mkdtemp()}  # no cached hash: the job's first run
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def child(name: str, checkpoint: str) -> None:
    import timm  # noqa: F401  (what a GPU job imports)
    import torch  # noqa: F401
    from wsiattack.encoders.model import build_encoder

    if checkpoint != "-":
        build_encoder(name, checkpoint=checkpoint)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: kB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=["demo", "uni"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    imports_mb = peak_rss_mb("demo", "-")
    print(f"imports alone: peak RSS {imports_mb:.0f} MB", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.encoders:
            path = Path(tmp) / f"{name}.safetensors"
            write_checkpoint(name, path, dtype=args.dtype)
            measured = peak_rss_mb(name, str(path)) - imports_mb
            estimate = cluster.encoder_host_mb(get_spec(name))
            print(
                f"RESULT {name} ({get_spec(name).n_params / 1e6:.1f} M values, {args.dtype} file "
                f"{path.stat().st_size / 2**20:.0f} MB): weights on the host {measured:.0f} MB measured, "
                f"{estimate} MB estimated (estimate / measured {estimate / max(measured, 1):.2f})",
                flush=True,
            )
            path.unlink()


if __name__ == "__main__":
    main()
