"""Benchmark: the extract rule's throughput against the encoder's raw forward-pass bound.

    cd /work/main && .venv/bin/python tests/benchmarks/bench_extract.py [--tiles 1024] [--threads 2]

Writes a tiles store of random-texture 224 px tiles with ``wsiattack.stores`` (the tiling
rule's layout: 16 tiles per Blosc-zstd chunk), then, in one run on the same machine, for the
``demo`` encoder (ViT-Ti/16) and a ViT-S/16 (timm ``vit_small_patch16_224``, random weights,
built through the custom-factory entry point):

- pipeline: ``extraction.extract_slide`` (read the store with the prefetching loader, convert,
  embed, check, write the features store), in features/s;
- bound: the same encoder's forward pass on in-memory float tensors of the same batch size
  (no I/O, no conversion, no store);
- their ratio (goal >= 0.9), from separate runs (medians; order flipped each repeat) and from
  one interleaved run, where ``extract_slide`` runs with a stand-in encoder that does the
  bound's forward on the matching in-memory batch before each pipeline batch and books it
  apart. On a machine shared with other jobs, whose load drifts over minutes, the interleaved
  ratio is the robust one (the CPU-seconds ratio of the separate runs is printed too).

Not collected by pytest (not named test_*).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "workflow_scripts"))

from wsiattack import extraction, stores  # noqa: E402
from wsiattack.encoders.model import TileEncoder, build_encoder, to_unit_pixels  # noqa: E402

TILE_PX = 224
VIT_S = {"factory": "timm:create_model", "input_px": 224, "embed_dim": 384, "readout": "cls",
         "kwargs": {"model_name": "vit_small_patch16_224", "num_classes": 0}}


def random_texture_tiles(n_tiles: int, *, seed: int = 0) -> np.ndarray:
    """uint8 (N, 224, 224, 3): blocky colour fields plus fine noise (compresses like tissue, ~2x)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(60, 230, size=(n_tiles, TILE_PX // 8, TILE_PX // 8, 3), dtype=np.uint8)
    tiles = coarse.repeat(8, axis=1).repeat(8, axis=2)
    noise = rng.integers(-12, 13, size=tiles.shape, dtype=np.int16)
    return np.clip(tiles + noise, 0, 255).astype(np.uint8)


def write_tiles_store(path: Path, tiles: np.ndarray) -> None:
    with stores.atomic_store(path, kind=stores.TILES, attrs={"slide_id": "bench", "tile_px": TILE_PX}) as group:
        array = stores.create_tiles_array(group, n_tiles=len(tiles), tile_px=TILE_PX)
        array[...] = tiles
        stores.write_array(group, "coords", np.zeros((len(tiles), 2), dtype=np.int64))


def _clocks() -> tuple[float, float]:
    """(wall, CPU of this process: all threads, user + system) in seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), usage.ru_utime + usage.ru_stime


def time_pipeline(encoder: TileEncoder, *, store: Path, out: Path, batch_size: int) -> tuple[float, float]:
    wall, cpu = _clocks()
    extraction.extract_slide(slide_id="bench", tiles_store=store, encoder=encoder, batch_size=batch_size, device=torch.device("cpu"), out_store=out)
    end_wall, end_cpu = _clocks()
    return end_wall - wall, end_cpu - cpu


@torch.inference_mode()
def time_bound(encoder: TileEncoder, batches: list[torch.Tensor]) -> tuple[float, float]:
    wall, cpu = _clocks()
    for pixels in batches:
        encoder(pixels)
    end_wall, end_cpu = _clocks()
    return end_wall - wall, end_cpu - cpu


class InterleavedBound(nn.Module):
    """Stands in for the encoder in ``extract_slide``: before each of the pipeline's batches it runs
    the bound's forward on the matching in-memory batch and books that time apart, so both see
    the same machine load, batch by batch (a shared machine's load drifts over minutes)."""

    def __init__(self, encoder: TileEncoder, batches: list[torch.Tensor]):
        super().__init__()
        self.encoder, self.spec, self.batches = encoder, encoder.spec, batches
        self.done, self.bound_s = 0, 0.0

    def describe(self) -> dict:
        return self.encoder.describe()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        self.encoder(self.batches[self.done % len(self.batches)])
        self.bound_s += time.perf_counter() - started
        self.done += 1
        return self.encoder(pixels)


def bench_encoder(label: str, encoder: TileEncoder, *, tiles: np.ndarray, store: Path, workdir: Path, batch_size: int, repeats: int) -> dict:
    """Separate runs (order flipped each repeat, so drifting load hits both alike), then one
    interleaved run (bound and pipeline alternating batch by batch)."""
    batches = [to_unit_pixels(tiles[s : s + batch_size]).contiguous() for s in range(0, len(tiles), batch_size)]
    time_bound(encoder, batches[:2])  # warm-up (allocator, oneDNN kernels)
    pipeline, bound = [], []
    for r in range(repeats):
        run_pipeline = lambda: pipeline.append(time_pipeline(encoder, store=store, out=workdir / f"{label}-{r}.zarr", batch_size=batch_size))  # noqa: E731
        run_bound = lambda: bound.append(time_bound(encoder, batches))  # noqa: E731
        for run in (run_pipeline, run_bound) if r % 2 == 0 else (run_bound, run_pipeline):
            run()
    interleaved = InterleavedBound(encoder, batches)
    total_s, _ = time_pipeline(interleaved, store=store, out=workdir / f"{label}-interleaved.zarr", batch_size=batch_size)
    n = len(tiles)
    wall_p, wall_b = statistics.median(w for w, _ in pipeline), statistics.median(w for w, _ in bound)
    return {
        "encoder": label,
        "pipeline_features_per_s": n / wall_p,
        "bound_features_per_s": n / wall_b,
        "ratio": wall_b / wall_p,  # of the median wall times of the separate runs
        "interleaved_pipeline_features_per_s": n / (total_s - interleaved.bound_s),
        "interleaved_bound_features_per_s": n / interleaved.bound_s,
        "interleaved_ratio": interleaved.bound_s / (total_s - interleaved.bound_s),
        "cpu_ratio": sum(c for _, c in bound) / sum(c for _, c in pipeline),  # CPU seconds, all threads
        "pipeline_s": pipeline,
        "bound_s": bound,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_extract_"))
    tiles = random_texture_tiles(args.tiles)
    store = workdir / "tiles.zarr"
    write_tiles_store(store, tiles)
    encoders = {"demo (ViT-Ti/16)": build_encoder("demo"), "ViT-S/16": build_encoder("vits16", custom=VIT_S)}
    results = [bench_encoder(label, enc, tiles=tiles, store=store, workdir=workdir, batch_size=args.batch_size, repeats=args.repeats) for label, enc in encoders.items()]
    print(f"{args.tiles} tiles of {TILE_PX} px, batch {args.batch_size}, torch threads {args.threads}, {args.repeats} repeats (medians)")
    for r in results:
        print(f"{r['encoder']:>18}: pipeline {r['pipeline_features_per_s']:7.1f} features/s, bound {r['bound_features_per_s']:7.1f} features/s, "
              f"ratio {r['ratio']:.3f} (CPU time {r['cpu_ratio']:.3f}); interleaved batch by batch: pipeline "
              f"{r['interleaved_pipeline_features_per_s']:.1f}, bound {r['interleaved_bound_features_per_s']:.1f}, ratio {r['interleaved_ratio']:.3f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
