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

With ``--from-slide`` it measures the default, coordinate-only path instead, on a pyramidal
JPEG TIFF written by ``bench_tiling.write_benchmark_slide`` (same 256 px JPEG tiles and tissue
shape as that bench's 22 928-tile slide, ``--slide-cols`` x ``--slide-rows`` cells: 48 x 44
gives ~2 200 tiles), per encoder and in one run:

- pipeline: ``tiling.tile_slide`` (coordinates only) + ``extraction.extract_slide`` reading the
  pixels from the slide (``TileReader``, ``--reader-threads`` background threads), wall time;
- bounds, each alone: the forward pass on in-memory float tensors of the same tiles, and the raw
  region read (OpenSlide's C decode of the same 2-D blocks into a buffer on ``--threads``
  threads, written nowhere: ``bench_tiling``'s bound);
- ``ratio = pipeline / (forward + raw read)`` (goal <= 1.1: nothing spent beyond decoding and
  the model) and ``overlap = extract / max(forward, raw read)``, which approaches 1 where spare
  cores decode while the model runs (a GPU node) and approaches the sum where they don't.

Not collected by pytest (not named test_*).
"""

from __future__ import annotations

import argparse
import json
import os
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

sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))

from wsiattack import extraction, stores, tiling  # noqa: E402
from wsiattack.encoders.embedding import to_unit_pixels  # noqa: E402
from wsiattack.encoders.model import TileEncoder, build_encoder  # noqa: E402
from wsiattack.tilereader import TileReader  # noqa: E402

TILE_PX = 224
VIT_S = {
    "factory": "timm:create_model",
    "input_px": 224,
    "embed_dim": 384,
    "readout": "cls",
    "kwargs": {"model_name": "vit_small_patch16_224", "num_classes": 0},
}


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
    extraction.extract_slide(
        slide_id="bench",
        tiles_store=store,
        encoder=encoder,
        batch_size=batch_size,
        device=torch.device("cpu"),
        out_store=out,
    )
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


def bench_encoder(
    label: str, encoder: TileEncoder, *, tiles: np.ndarray, store: Path, workdir: Path, batch_size: int, repeats: int
) -> dict:
    """Separate runs (order flipped each repeat, so drifting load hits both alike), then one
    interleaved run (bound and pipeline alternating batch by batch)."""
    batches = [to_unit_pixels(tiles[s : s + batch_size]).contiguous() for s in range(0, len(tiles), batch_size)]
    time_bound(encoder, batches[:2])  # warm-up (allocator, oneDNN kernels)
    pipeline, bound = [], []
    for r in range(repeats):

        def run_pipeline(r: int = r) -> None:
            pipeline.append(
                time_pipeline(encoder, store=store, out=workdir / f"{label}-{r}.zarr", batch_size=batch_size)
            )

        def run_bound() -> None:
            bound.append(time_bound(encoder, batches))

        for run in (run_pipeline, run_bound) if r % 2 == 0 else (run_bound, run_pipeline):
            run()
    interleaved = InterleavedBound(encoder, batches)
    total_s, _ = time_pipeline(
        interleaved, store=store, out=workdir / f"{label}-interleaved.zarr", batch_size=batch_size
    )
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


def bench_from_slide(
    label: str, encoder: TileEncoder, *, slide: Path, workdir: Path, batch_size: int, threads: int, reader_threads: int
) -> dict:
    """Tile (coordinates only) + extract from the slide, against forward alone + raw read alone."""
    import bench_tiling

    spec = {**bench_tiling.SPEC, "store_pixels": False}
    store, out = workdir / f"{label}-coords.zarr", workdir / f"{label}-features.zarr"
    os.sync()
    started = time.perf_counter()
    n = tiling.tile_slide(
        slide_id="bench",
        slide_path=slide,
        spec=spec,
        out_store=store,
        out_qc=workdir / f"{label}-qc.png",
        threads=threads,
    )
    tiled = time.perf_counter()
    extraction.extract_slide(
        slide_id="bench",
        tiles_store=store,
        slide_path=slide,
        encoder=encoder,
        batch_size=batch_size,
        device=torch.device("cpu"),
        out_store=out,
        reader_threads=reader_threads,
    )
    pipeline_s, tile_s = time.perf_counter() - started, tiled - started
    _, blocks, _ = bench_tiling.raw_regions(store)
    raw_s = bench_tiling.run_raw(slide, blocks, threads=threads, n_tiles=n, decode=bench_tiling.decode_c_buffer)[
        "wall_s"
    ]
    with TileReader(store, slide_path=slide) as reader:
        batches = [to_unit_pixels(reader[s : s + batch_size]).contiguous() for s in range(0, n, batch_size)]
    time_bound(encoder, batches[:2])  # warm-up, as for the pipeline's first batches
    forward_s, _ = time_bound(encoder, batches)
    return {
        "encoder": label,
        "tiles": n,
        "tile_s": tile_s,
        "extract_s": pipeline_s - tile_s,
        "pipeline_s": pipeline_s,
        "forward_s": forward_s,
        "raw_read_s": raw_s,
        "ratio": pipeline_s / (forward_s + raw_s),
        "overlap": (pipeline_s - tile_s) / max(forward_s, raw_s),
    }


def main_from_slide(args: argparse.Namespace, encoders: dict[str, TileEncoder], workdir: Path) -> None:
    import bench_tiling

    slide = workdir / "bench-region.tiff"
    bench_tiling.write_benchmark_slide(slide, cols=args.slide_cols, rows=args.slide_rows)
    results = [
        bench_from_slide(
            label,
            enc,
            slide=slide,
            workdir=workdir,
            batch_size=args.batch_size,
            threads=args.threads,
            reader_threads=args.reader_threads,
        )
        for label, enc in encoders.items()
    ]
    print(
        f"coordinate-only tiles from a {args.slide_cols} x {args.slide_rows}-cell JPEG TIFF, batch {args.batch_size}, torch threads {args.threads}, reader threads {args.reader_threads}, load {os.getloadavg()[0]:.1f}"
    )
    for r in results:
        print(
            f"{r['encoder']:>18}: {r['tiles']} tiles; tile {r['tile_s']:.1f} s + extract {r['extract_s']:.1f} s = {r['pipeline_s']:.1f} s; "
            f"forward alone {r['forward_s']:.1f} s + raw read alone {r['raw_read_s']:.1f} s = {r['forward_s'] + r['raw_read_s']:.1f} s; "
            f"ratio {r['ratio']:.3f} (goal <= 1.1), overlap {r['overlap']:.3f}"
        )
    print(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--from-slide",
        action="store_true",
        help="coordinate-only tiles read from a JPEG TIFF (see the module docstring)",
    )
    parser.add_argument("--slide-cols", type=int, default=48)
    parser.add_argument("--slide-rows", type=int, default=44)
    parser.add_argument(
        "--reader-threads", type=int, default=1, help="background decode threads (the extract rule's threads)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_extract_"))
    encoders = {"demo (ViT-Ti/16)": build_encoder("demo"), "ViT-S/16": build_encoder("vits16", custom=VIT_S)}
    if args.from_slide:
        main_from_slide(args, encoders, workdir)
        return
    tiles = random_texture_tiles(args.tiles)
    store = workdir / "tiles.zarr"
    write_tiles_store(store, tiles)
    results = [
        bench_encoder(
            label, enc, tiles=tiles, store=store, workdir=workdir, batch_size=args.batch_size, repeats=args.repeats
        )
        for label, enc in encoders.items()
    ]
    print(
        f"{args.tiles} tiles of {TILE_PX} px, batch {args.batch_size}, torch threads {args.threads}, {args.repeats} repeats (medians)"
    )
    for r in results:
        print(
            f"{r['encoder']:>18}: pipeline {r['pipeline_features_per_s']:7.1f} features/s, bound {r['bound_features_per_s']:7.1f} features/s, "
            f"ratio {r['ratio']:.3f} (CPU time {r['cpu_ratio']:.3f}); interleaved batch by batch: pipeline "
            f"{r['interleaved_pipeline_features_per_s']:.1f}, bound {r['interleaved_bound_features_per_s']:.1f}, ratio {r['interleaved_ratio']:.3f}"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
