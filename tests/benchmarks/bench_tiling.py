"""Benchmark: tiling throughput against the raw OpenSlide bound, and tiling's peak memory.

    cd /work/main && .venv/bin/python tests/benchmarks/bench_tiling.py [--workdir DIR] [--threads 2]

Writes a large pyramidal JPEG TIFF (>= 20 000 tissue tiles of 224 px at 0.5 µm/px), then, in one
run on the same machine:

- pipeline: ``tiling.tile_slide(threads=N)`` writing the real zarr store, in a subprocess whose
  peak RSS is read with ``getrusage(RUSAGE_CHILDREN)``;
- raw bound: the same tiles (coords from that store) read and decoded by OpenSlide and written
  nowhere, with the fastest strategy found (threaded reads of row runs or of 2-D blocks);
- their ratio (goal >= 0.8) and the peak RSS (goal <= 1.5 GB).

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
