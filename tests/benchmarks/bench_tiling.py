"""Benchmark: tiling throughput against the raw OpenSlide bound, and tiling's peak memory.

    cd /work/main && .venv/bin/python tests/benchmarks/bench_tiling.py [--workdir DIR] [--slide PATH] [--threads 2] [--repeats 3]

Writes a large pyramidal JPEG TIFF (>= 20 000 tissue tiles of 224 px at 0.5 µm/px; reused when
``--slide`` names an existing file), then, in rounds that each run everything back to back so
that all figures of a round saw about the same machine load:

- pipeline: ``tiling.tile_slide(threads=N)`` writing the real zarr store (the store's own tiles
  codec, ``stores._TILES_COMPRESSOR``), in a subprocess that reports its peak RSS and store size;
- raw bound: the same tiles (coords from that store) read and decoded by OpenSlide on the same
  N threads and written nowhere, with the fastest strategy found: row runs or 2-D blocks through
  ``read_region``, or the 2-D blocks decoded by the C library straight into a numpy buffer
  (``openslide_read_region`` without openslide-python's ARGB -> RGBA pass and PIL image);
- variants (``--variants``): the pipeline with another tiles codec (``cname:clevel:shuffle``),
  with none, or ``nowrite`` (everything but storing the tiles: plan, reads, QC image), to
  attribute the gap between the pipeline and the bound;
- write floor: the store's own chunk files (same count, same sizes) written with plain
  ``os.write`` from memory, i.e. what the kernel alone charges for putting those bytes on disk.
  ``raw CPU / (raw CPU + floor CPU)`` is the ratio a store-writing pipeline could reach if every
  other cost were zero: the ceiling for any pipeline that stores the decoded tiles.

Every timed run starts after ``os.sync()``, so the write-back of the previous run's store does
not land on the next measurement, and with its output already deleted (as Snakemake does before
a job), so deleting the previous round's store is not timed either.

Prints each round, the best of each configuration with its CPU-ms per tile (the steadier figure
when other jobs share the CPUs), and a final ``RESULT:`` line: pipeline tiles/s, raw bound
tiles/s, their ratio (goal >= 0.8), the write-floor ceiling, peak RSS (goal <= 1.5 GB), store
size, load averages.

Not collected by pytest (not named test_*).
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import openslide
import tifffile
from wsiattack import stores, tiling
from wsiattack.synthetic import render_slide

ROOT = Path(__file__).resolve().parents[2]

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
    "store_pixels": True,  # this bench measures the pixel-store mode (the default stores coordinates only)
    "tissue": {
        "method": "otsu",
        "min_fraction": 0.5,
        "thumbnail_mpp": 8.0,
        "min_object_um2": 20000.0,
        "max_hole_um2": 20000.0,
    },
}


# --------------------------------------------------------------------------------------------
# The benchmark slide
# --------------------------------------------------------------------------------------------


def texture_tiles(*, n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` distinct H&E-like 256 px tiles: the most tissue-covered cells of a rendered image."""
    image = render_slide(rng=np.random.default_rng(seed), width_px=2048, height_px=2048, tumor=True)
    cells = [
        image[y : y + TIFF_TILE_PX, x : x + TIFF_TILE_PX]
        for y in range(0, 2048, TIFF_TILE_PX)
        for x in range(0, 2048, TIFF_TILE_PX)
    ]
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
    small = [
        t.reshape(block, downsample, block, downsample, 3).mean(axis=(1, 3)).round().astype(np.uint8) for t in textures
    ]
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
                tile[i * block : (i + 1) * block, j * block : (j + 1) * block] = (
                    small[_variant(row, col)] if cells[row, col] else glass
                )
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
        tif.write(
            _level0_segments(cells, segments, glass),
            shape=(height, width, 3),
            dtype=np.uint8,
            tile=(TIFF_TILE_PX, TIFF_TILE_PX),
            **_page_args(0),
        )
        for level, downsample in enumerate(DOWNSAMPLES[1:], start=1):
            shape = (math.ceil(height / downsample), math.ceil(width / downsample), 3)
            tif.write(
                _reduced_tiles(cells, textures, downsample),
                shape=shape,
                dtype=np.uint8,
                tile=(TIFF_TILE_PX, TIFF_TILE_PX),
                **_page_args(level),
            )


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------

# Pipeline variants: the store's own codec (stores._TILES_COMPRESSOR), or another one for the tiles
# array given as cname:clevel:shuffle (Blosc), or "none"; the figures attribute the cost of compressing.
DEFAULT_VARIANTS = ("none", "nowrite")


def codec_of(variant: str):
    from zarr.codecs import BloscCodec

    if variant == "none":
        return None
    cname, clevel, shuffle = variant.split(":")
    return BloscCodec(cname=cname, clevel=int(clevel), shuffle=shuffle)


def child_main(args: argparse.Namespace) -> None:
    """Subprocess: tile the slide once and print its timing, peak RSS and store size as JSON."""
    if args.codec == "nowrite":  # consume the tiles, store nothing (the store keeps its coords)
        tiling.write_in_chunks = lambda array, *, batches: sum(len(batch) for batch in batches)
    elif args.codec != "store":
        stores._TILES_COMPRESSOR = codec_of(args.codec)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    n = tiling.tile_slide(
        slide_id="bench",
        slide_path=args.slide,
        spec=SPEC,
        out_store=args.out,
        out_qc=Path(args.out).with_suffix(".png"),
        threads=args.threads,
    )
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    store_bytes = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(
        json.dumps(
            {
                "n": n,
                "wall_s": wall,
                "cpu_s": cpu,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "store_mb": store_bytes / 1e6,
            }
        )
    )


def run_pipeline(slide: Path, out: Path, *, threads: int, codec: str = "store") -> dict:
    # Snakemake deletes a job's outputs before it starts: the previous round's store (3.4 GB,
    # seconds to delete) must not be removed inside the timed run by atomic_store's replace.
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    command = [
        sys.executable,
        __file__,
        "--child",
        "--slide",
        str(slide),
        "--out",
        str(out),
        "--threads",
        str(threads),
        "--codec",
        codec,
    ]
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


def decode_read_region(region: tuple[int, int, int, int], *, handle: openslide.OpenSlide) -> None:
    """openslide-python's public path: decode, ARGB -> RGBA, PIL image (dropped)."""
    handle.read_region((region[0], region[1]), 0, (region[2], region[3]))


def decode_c_buffer(region: tuple[int, int, int, int], *, handle: openslide.OpenSlide) -> None:
    """Only the C library's decode into a preallocated premultiplied-ARGB buffer (through
    openslide-python's private ``_read_region`` binding: a bound, not pipeline code)."""
    from openslide import lowlevel

    x, y, w, h = region
    buffer = np.empty((h, w), dtype=np.uint32)
    lowlevel._read_region(handle._osr, buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)), x, y, 0, w, h)


def run_raw(
    slide: Path, regions: list[tuple[int, int, int, int]], *, threads: int, n_tiles: int, decode=decode_read_region
) -> dict:
    """OpenSlide decoding the regions with ``decode`` on ``threads`` threads, written nowhere."""
    os.sync()
    with openslide.OpenSlide(slide) as handle:
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for _ in pool.map(partial(decode, handle=handle), regions):
                pass
        return {"n": n_tiles, "wall_s": time.perf_counter() - start_wall, "cpu_s": time.process_time() - start_cpu}


def run_write_floor(store: Path, workdir: Path, *, n_tiles: int) -> dict:
    """Write files of the sizes of ``store``'s tiles chunks from one in-memory buffer (create,
    write, close: no codec, no zarr); wall and CPU time (user + system) as for the other runs."""
    sizes = [f.stat().st_size for f in (store / "tiles").rglob("*") if f.is_file() and f.name != "zarr.json"]
    buffer = memoryview(np.random.default_rng(0).integers(0, 256, max(sizes), dtype=np.uint8).tobytes())
    out = workdir / "floor"
    out.mkdir()
    os.sync()
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    for i, size in enumerate(sizes):
        fd = os.open(out / str(i), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            os.write(fd, buffer[:size])
        finally:
            os.close(fd)
    result = {"n": n_tiles, "wall_s": time.perf_counter() - start_wall, "cpu_s": time.process_time() - start_cpu}
    shutil.rmtree(out)
    return result


def rate(result: dict) -> float:
    return result["n"] / result["wall_s"]


def cpu_ms(result: dict) -> float:
    return result["cpu_s"] / result["n"] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the slide and stores go (default: a temporary directory)"
    )
    parser.add_argument(
        "--slide",
        type=Path,
        default=None,
        help="benchmark slide to reuse (written there first if missing; default: in the workdir)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds, each running the pipeline, the raw bound and the variants back to back",
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        default=list(DEFAULT_VARIANTS),
        help="other tiles codecs to run (cname:clevel:shuffle or none)",
    )
    parser.add_argument("--cols", type=int, default=160, help="slide width in 256 px TIFF tiles")
    parser.add_argument("--rows", type=int, default=140, help="slide height in 256 px TIFF tiles")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--codec", default="store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        report(Path(workdir), args)


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def report(workdir: Path, args: argparse.Namespace) -> None:
    slide, store = args.slide or workdir / "bench.tiff", workdir / "bench.zarr"
    load_before = load()
    if not slide.exists():
        start = time.perf_counter()
        write_benchmark_slide(slide, cols=args.cols, rows=args.rows)
        print(
            f"slide: {args.cols * TIFF_TILE_PX} x {args.rows * TIFF_TILE_PX} px, {slide.stat().st_size / 1e6:.0f} MB, written in {time.perf_counter() - start:.1f} s, "
            f"generator peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB",
            flush=True,
        )
    slide.read_bytes()  # into the page cache: every run below reads from memory
    codec = stores._TILES_COMPRESSOR
    pipeline = (
        f"pipeline ({codec.cname.value}:{codec.clevel}:{codec.shuffle.value})"
        if codec is not None
        else "pipeline (no codec)"
    )
    raw_names = ("raw rows", "raw blocks", "raw blocks, C buffer")
    names = [pipeline, *raw_names, *(f"pipeline, codec {v}" for v in args.variants), "write floor"]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.repeats):
        # One round runs everything back to back, so each of its figures saw about the same load.
        runs[pipeline].append(run_pipeline(slide, store, threads=args.threads))
        rows, blocks, n_tiles = raw_regions(store)
        runs["raw rows"].append(run_raw(slide, rows, threads=args.threads, n_tiles=n_tiles))
        runs["raw blocks"].append(run_raw(slide, blocks, threads=args.threads, n_tiles=n_tiles))
        runs["raw blocks, C buffer"].append(
            run_raw(slide, blocks, threads=args.threads, n_tiles=n_tiles, decode=decode_c_buffer)
        )
        for variant in args.variants:
            runs[f"pipeline, codec {variant}"].append(
                run_pipeline(slide, workdir / "variant.zarr", threads=args.threads, codec=variant)
            )
        runs["write floor"].append(run_write_floor(store, workdir, n_tiles=n_tiles))
        raw_i = max((runs[name][-1] for name in raw_names), key=rate)
        print(
            f"round {round_ + 1}: load {load()}; raw {rate(raw_i):.0f} tiles/s; "
            + "; ".join(
                f"{name} {rate(runs[name][-1]):.0f} tiles/s = {rate(runs[name][-1]) / rate(raw_i):.2f}"
                for name in names
                if name.startswith("pipeline")
            ),
            flush=True,
        )
    raws = [max(round_, key=rate) for round_ in zip(*(runs[name] for name in raw_names), strict=True)]
    raw = max(raws, key=rate)
    raw_cpu = min(cpu_ms(r) for name in raw_names for r in runs[name])
    print(
        f"tiles: {n_tiles} of {SPEC['tile_px']} px at {SPEC['target_mpp']} µm/px; threads={args.threads}; cpus={os.cpu_count()}; "
        f"load average before {load_before}, after {load()} (1, 5, 15 min; other jobs share the CPUs: CPU-ms/tile is the steadier figure)"
    )
    for name in names:
        best = max(runs[name], key=rate)
        every = ", ".join(f"{rate(r):.0f}" for r in runs[name])
        extra = ""
        if name.startswith("pipeline"):
            ratios = sorted(rate(p) / rate(r) for p, r in zip(runs[name], raws, strict=True))
            extra = (
                f"  ratio best/best {rate(best) / rate(raw):.2f}, per round median {ratios[len(ratios) // 2]:.2f}, "
                f"CPU {raw_cpu / min(map(cpu_ms, runs[name])):.2f}; store {best['store_mb']:.0f} MB, peak RSS {max(r['peak_rss_mb'] for r in runs[name]):.0f} MB"
            )
        print(
            f"{name:>36}: {rate(best):6.0f} tiles/s  {min(map(cpu_ms, runs[name])):5.2f} CPU-ms/tile  (runs: {every}){extra}"
        )
    floor_cpu = min(map(cpu_ms, runs["write floor"]))
    ceiling = raw_cpu / (raw_cpu + floor_cpu)
    print(
        f"ceiling: decoding ({raw_cpu:.2f} CPU-ms/tile) plus only the kernel's cost of writing the store's bytes ({floor_cpu:.2f}) gives at most {ceiling:.2f}"
    )
    best = max(runs[pipeline], key=rate)
    ratios = sorted(rate(p) / rate(r) for p, r in zip(runs[pipeline], raws, strict=True))
    print(
        f"RESULT: pipeline {rate(best):.0f} tiles/s, raw bound {rate(raw):.0f} tiles/s, ratio {rate(best) / rate(raw):.2f} "
        f"(best of {args.repeats} each; per-round median {ratios[len(ratios) // 2]:.2f}; in CPU-ms/tile {raw_cpu / min(map(cpu_ms, runs[pipeline])):.2f}; goal >= 0.8; "
        f"write-floor ceiling {ceiling:.2f}), "
        f"peak RSS {max(r['peak_rss_mb'] for r in runs[pipeline]):.0f} MB (goal <= 1536 MB), store {best['store_mb']:.0f} MB for {n_tiles} tiles, "
        f"load {load_before} -> {load()}"
    )


if __name__ == "__main__":
    main()
