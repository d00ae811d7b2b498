"""Benchmark: tiling throughput against the raw OpenSlide bound, and tiling's peak memory.

    cd /work/main && .venv/bin/python tests/benchmarks/bench_tiling.py [--workdir DIR] [--threads 2]

Writes a large pyramidal JPEG TIFF (>= 20 000 tissue tiles of 224 px at 0.5 µm/px), then, in one
run on the same machine:

- pipeline: ``tiling.tile_slide(threads=N)`` writing the real zarr store, in a subprocess whose
  peak RSS is read with ``getrusage(RUSAGE_CHILDREN)``;
- raw bound: the same tiles (coords from that store) read and decoded by OpenSlide and written
  nowhere, with the fastest strategy found (threaded reads of row runs or of 2-D blocks);
- their ratio (goal >= 0.8) and the peak RSS (goal <= 1.5 GB);
- diagnostics: the pipeline with a cheaper codec (lz4) and with none, to attribute the gap.

Not collected by pytest (not named test_*).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openslide
import tifffile

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "workflow_scripts"))

from wsiattack import stores, tiling  # noqa: E402
from wsiattack.synthetic import render_slide  # noqa: E402

TIFF_TILE_PX = 256
MPP = 0.5
DOWNSAMPLES = (1, 4, 16)
GLASS_RGB = (242, 241, 243)
N_TEXTURES = 8
SPEC = {
    "tile_px": 224,
    "target_mpp": 0.5,
    "mpp_tolerance": 0.05,
    "allow_objective_power": False,
    "skip_empty": False,
    "tissue": {"method": "otsu", "min_fraction": 0.5, "thumbnail_mpp": 8.0, "min_object_um2": 20000.0, "max_hole_um2": 20000.0},
}


# --------------------------------------------------------------------------------------------
# The benchmark slide
# --------------------------------------------------------------------------------------------


def texture_tiles(*, n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` distinct H&E-like 256 px tiles: the most tissue-covered cells of a rendered image."""
    image = render_slide(rng=np.random.default_rng(seed), width_px=2048, height_px=2048, tumor=True)
    cells = [image[y : y + TIFF_TILE_PX, x : x + TIFF_TILE_PX] for y in range(0, 2048, TIFF_TILE_PX) for x in range(0, 2048, TIFF_TILE_PX)]
    stained = [float((cell.min(axis=-1) < 215).mean()) for cell in cells]
    return [np.ascontiguousarray(cells[i]) for i in np.argsort(stained)[::-1][:n]]


def jpeg_segment(tile: np.ndarray) -> bytes:
    """The compressed segment tifffile writes for ``tile`` (so it can be reused verbatim)."""
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tif:
        tif.write(tile, tile=(TIFF_TILE_PX, TIFF_TILE_PX), **_page_args(0))
    with tifffile.TiffFile(io.BytesIO(buffer.getvalue())) as tif:
        page = tif.pages[0]
        return buffer.getvalue()[page.dataoffsets[0] : page.dataoffsets[0] + page.databytecounts[0]]


def _page_args(level: int) -> dict:
    px_per_cm = 1e4 / (MPP * DOWNSAMPLES[level])
    return {
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": 90},
        "subfiletype": 0 if level == 0 else 1,
        "resolution": (px_per_cm, px_per_cm),
        "resolutionunit": "CENTIMETER",
        "metadata": None,
    }


def tissue_cells(*, cols: int, rows: int) -> np.ndarray:
    """Boolean (rows, cols) grid of 256 px cells: a superellipse of tissue with a glass margin."""
    y, x = np.mgrid[0:rows, 0:cols]
    u = (x + 0.5 - cols / 2) / (0.46 * cols)
    v = (y + 0.5 - rows / 2) / (0.46 * rows)
    return u**4 + v**4 <= 1.0


def _variant(row: int, col: int) -> int:
    return (row * 31 + col * 17) % N_TEXTURES


def _level0_segments(cells: np.ndarray, segments: list[bytes], glass: bytes) -> Iterator[bytes]:
    for row, col in np.ndindex(cells.shape):
        yield segments[_variant(row, col)] if cells[row, col] else glass


def _reduced_tiles(cells: np.ndarray, textures: list[np.ndarray], downsample: int) -> Iterator[np.ndarray]:
    """Tiles of a reduced level, each assembled from box-downsampled 256 px level-0 cells."""
    block = TIFF_TILE_PX // downsample
    small = [t.reshape(block, downsample, block, downsample, 3).mean(axis=(1, 3)).round().astype(np.uint8) for t in textures]
    glass = np.empty((block, block, 3), np.uint8)
    glass[:] = GLASS_RGB
    rows, cols = cells.shape
    level_rows, level_cols = -(-rows // downsample), -(-cols // downsample)
    for tile_row, tile_col in np.ndindex(level_rows, level_cols):
        tile = np.empty((TIFF_TILE_PX, TIFF_TILE_PX, 3), np.uint8)
        tile[:] = GLASS_RGB
        for i, j in np.ndindex(downsample, downsample):
            row, col = tile_row * downsample + i, tile_col * downsample + j
            if row < rows and col < cols:
                tile[i * block : (i + 1) * block, j * block : (j + 1) * block] = small[_variant(row, col)] if cells[row, col] else glass
        yield tile


def write_benchmark_slide(path: Path, *, cols: int, rows: int) -> None:
    """Pyramidal JPEG TIFF of ``cols x rows`` 256 px cells, written tile by tile (small memory)."""
    textures = texture_tiles(n=N_TEXTURES)
    glass_tile = np.empty((TIFF_TILE_PX, TIFF_TILE_PX, 3), np.uint8)
    glass_tile[:] = GLASS_RGB
    segments, glass = [jpeg_segment(t) for t in textures], jpeg_segment(glass_tile)
    cells = tissue_cells(cols=cols, rows=rows)
    width, height = cols * TIFF_TILE_PX, rows * TIFF_TILE_PX
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(_level0_segments(cells, segments, glass), shape=(height, width, 3), dtype=np.uint8, tile=(TIFF_TILE_PX, TIFF_TILE_PX), **_page_args(0))
        for level, downsample in enumerate(DOWNSAMPLES[1:], start=1):
            shape = (math.ceil(height / downsample), math.ceil(width / downsample), 3)
            tif.write(_reduced_tiles(cells, textures, downsample), shape=shape, dtype=np.uint8, tile=(TIFF_TILE_PX, TIFF_TILE_PX), **_page_args(level))


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------

# Diagnostics only (the store's codec is stores._COMPRESSOR): what compression costs the pipeline.
DIAGNOSTIC_CODECS = {"lz4": {"cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}, "none": None}


def child_main(args: argparse.Namespace) -> None:
    """Subprocess: tile the slide once and print its timing as JSON (its RSS is the parent's figure)."""
    if args.codec in DIAGNOSTIC_CODECS:
        from zarr.codecs import BloscCodec

        config = DIAGNOSTIC_CODECS[args.codec]
        stores._COMPRESSOR = None if config is None else BloscCodec(**config)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    n = tiling.tile_slide(slide_id="bench", slide_path=args.slide, spec=SPEC, out_store=args.out, out_qc=Path(args.out).with_suffix(".png"), threads=args.threads)
    print(json.dumps({"n": n, "wall_s": time.perf_counter() - start_wall, "cpu_s": time.process_time() - start_cpu}))


def run_pipeline(slide: Path, out: Path, *, threads: int, codec: str = "store") -> dict:
    command = [sys.executable, __file__, "--child", "--slide", str(slide), "--out", str(out), "--threads", str(threads), "--codec", codec]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def raw_regions(store: Path) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int, int, int]], int]:
    """Level-0 regions (x, y, w, h) covering the store's tiles two ways: row runs and 2-D blocks."""
    group = stores.open_store(store, kind=stores.TILES)
    coords, tile = np.asarray(group["coords"][...]), int(group.attrs["tile_px"])
    cells = np.unique(coords[:, ::-1] // tile, axis=0)  # (row, col); 0.5 µm/px slide: side = tile
    rows = []
    for row in np.unique(cells[:, 0]):
        cols = cells[cells[:, 0] == row, 1]
        for run in np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1):
            rows.append((int(run[0]) * tile, int(row) * tile, len(run) * tile, tile))
    blocks = tiling.plan_blocks(cells, block_cells=tiling.BLOCK_LEVEL_PX // tile)
    return rows, [(b.col0 * tile, b.row0 * tile, b.cols * tile, b.rows * tile) for b in blocks], len(coords)


def run_raw(slide: Path, regions: list[tuple[int, int, int, int]], *, threads: int, n_tiles: int) -> dict:
    """OpenSlide decoding the regions on ``threads`` threads; the images are dropped."""
    with openslide.OpenSlide(slide) as handle:
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for _ in pool.map(lambda r: handle.read_region((r[0], r[1]), 0, (r[2], r[3])), regions):
                pass
        return {"n": n_tiles, "wall_s": time.perf_counter() - start_wall, "cpu_s": time.process_time() - start_cpu}


def rate(result: dict) -> float:
    return result["n"] / result["wall_s"]


def cpu_ms(result: dict) -> float:
    return result["cpu_s"] / result["n"] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="where the slide and stores go (default: a temporary directory)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved pipeline/raw rounds; the best of each is reported")
    parser.add_argument("--cols", type=int, default=160, help="slide width in 256 px TIFF tiles")
    parser.add_argument("--rows", type=int, default=140, help="slide height in 256 px TIFF tiles")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--slide", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--codec", default="store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        report(Path(workdir), args)


def report(workdir: Path, args: argparse.Namespace) -> None:
    slide, store = workdir / "bench.tiff", workdir / "bench.zarr"
    start = time.perf_counter()
    write_benchmark_slide(slide, cols=args.cols, rows=args.rows)
    print(f"slide: {args.cols * TIFF_TILE_PX} x {args.rows * TIFF_TILE_PX} px, {slide.stat().st_size / 1e6:.0f} MB, written in {time.perf_counter() - start:.1f} s, "
          f"generator peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB", flush=True)
    slide.read_bytes()  # into the page cache: every run below reads from memory
    pipeline, raw_rows, raw_blocks = [], [], []
    for _ in range(args.repeats):
        pipeline.append(run_pipeline(slide, store, threads=args.threads))
        rows, blocks, n_tiles = raw_regions(store)
        raw_rows.append(run_raw(slide, rows, threads=args.threads, n_tiles=n_tiles))
        raw_blocks.append(run_raw(slide, blocks, threads=args.threads, n_tiles=n_tiles))
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    diagnostics = {codec: run_pipeline(slide, workdir / f"{codec}.zarr", threads=args.threads, codec=codec) for codec in DIAGNOSTIC_CODECS}
    runs = {"pipeline": pipeline, "raw rows": raw_rows, "raw blocks": raw_blocks}
    best = {name: max(results, key=rate) for name, results in runs.items()}
    raw = max(best["raw rows"], best["raw blocks"], key=rate)
    print(f"tiles: {n_tiles} of {SPEC['tile_px']} px at {SPEC['target_mpp']} µm/px; threads={args.threads}; cpus={os.cpu_count()}; "
          f"load average {os.getloadavg()[0]:.1f} (other jobs share the CPUs: CPU-ms/tile is the steadier figure)")
    for name, result in best.items():
        every = ", ".join(f"{rate(r):.0f}" for r in runs[name])
        print(f"{name:>26}: {rate(result):6.0f} tiles/s  {cpu_ms(result):5.2f} CPU-ms/tile  (runs: {every} tiles/s)")
    for codec, result in diagnostics.items():
        print(f"{'pipeline, codec ' + codec:>26}: {rate(result):6.0f} tiles/s  {cpu_ms(result):5.2f} CPU-ms/tile  (diagnostic: {DIAGNOSTIC_CODECS[codec]} instead of the store's codec)")
    print(f"ratio pipeline / raw bound: {rate(best['pipeline']) / rate(raw):.2f} in tiles/s, {cpu_ms(raw) / cpu_ms(best['pipeline']):.2f} in CPU time (goal >= 0.8)")
    print("  diagnostics, in tiles/s: " + ", ".join(f"codec {codec} {rate(result) / rate(raw):.2f}" for codec, result in diagnostics.items()))
    print(f"peak RSS of tile_slide: {peak_rss_mb:.0f} MB (goal <= 1536 MB)")

if __name__ == "__main__":
    main()
