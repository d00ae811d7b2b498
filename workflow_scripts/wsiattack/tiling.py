"""Tiling: tissue grid at the target resolution -> tiles store + QC thumbnail.

Resolution handling: every tile covers ``tile_px * target_mpp`` µm whatever the scanner. The
pyramid level read is the coarsest one not coarser than the target (``slides.choose_level``);
when its mpp differs from the target the region is resized to ``tile_px`` (non-integer factors
included): each tile is resized from its own window of level pixels, so its pixels do not depend
on which other tiles are read with it. Coordinates are level-0 pixels of the tile's top-left
corner.

Store contents: by default a tiles store holds the tiles' coordinates and geometry only, and
every stage that needs pixels re-reads them from the slide (``tilereader.TileReader``), which
gives every stage byte-identical tiles; ``tiling.store_pixels: true`` also stores the decoded
tiles (for GPU nodes with too few CPU cores to decode while the model runs).

Throughput: the kept grid cells are grouped into blocks of at most ``BLOCK_LEVEL_PX`` square
(in pixels of the level read); each block is one ``read_region`` (not one per tile), read on a
pool of ``threads`` with a bounded number of blocks in flight, so memory does not grow with the
slide. Tiles are stored block by block (row-major inside a block, blocks left to right in bands
top to bottom): a deterministic order, recorded in ``coords``. Whole chunks are written in order
by one writer thread, so compressing and storing overlap reading (``write_in_chunks``); the tiles
codec is a fast one (``stores._TILES_COMPRESSOR``, measured by tests/benchmarks/bench_tiling.py).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsiattack import stores
from wsiattack.errors import SlideError
from wsiattack.tilegrid import (  # noqa: F401 (BLOCK_LEVEL_PX, block_order: re-exported)
    BLOCK_LEVEL_PX,
    Block,
    TileGeometry,
    block_cells,
    block_order,
    plan_blocks,
)

# Tiling needs OpenSlide, Pillow and SciPy (envs/slides.yaml); rules in other environments import
# this module only for expected_tiles_attrs, so a missing reader is reported when a slide is tiled.
try:
    from PIL import Image, ImageDraw

    from wsiattack import slides, tissue
except ImportError as error:
    _READER_MISSING: ImportError | None = error
else:
    _READER_MISSING = None

log = logging.getLogger(__name__)

SKIPPED_NO_TISSUE = "no tissue"
# Chunks stored per zarr call (zarr compresses a call's chunks concurrently) and slabs queued for
# the writer thread: 4 x 16 tiles of 224 px is 9.6 MB a slab, ~40 MB for the whole write path.
WRITE_CHUNKS = 4
WRITE_DEPTH = 2


@dataclass(frozen=True)
class TilingPlan:
    """Everything decided before any tile is read."""

    geometry: TileGeometry
    thumbnail: np.ndarray
    mask: np.ndarray  # tissue, on the thumbnail
    blocks: list[Block]

    @property
    def cells(self) -> np.ndarray:
        """(row, col) of every tile, in store order."""
        return np.concatenate([b.cells for b in self.blocks]) if self.blocks else np.empty((0, 2), dtype=np.int64)


def tile_slide(
    *,
    slide_id: str,
    slide_path: str | Path,
    spec: Mapping[str, Any],
    out_store: str | Path,
    out_qc: str | Path,
    mpp_override: float | None = None,
    threads: int = 1,
) -> int:
    """Tile one slide into ``out_store`` (tiles store) and ``out_qc`` (PNG); return the tile count.

    A slide without tissue is an error, unless ``spec["skip_empty"]``: then the store holds 0
    tiles and ``attrs["skipped"] == "no tissue"``. On any error nothing is left behind.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if _READER_MISSING is not None:
        raise ImportError(
            f"tiling needs the slides environment (envs/slides.yaml): {_READER_MISSING}"
        ) from _READER_MISSING
    with slides.open_slide(
        slide_path, slide_id=slide_id, mpp_override=mpp_override, allow_objective_power=spec["allow_objective_power"]
    ) as slide:
        plan = plan_tiling(slide, spec=spec, threads=threads)
        geometry, coords = plan.geometry, plan.geometry.coords(plan.cells)
        attrs = tiles_store_attrs(slide.info, geometry=geometry, spec=spec)
        if not len(coords):
            attrs["skipped"] = _no_tissue(slide.info, spec=spec)
        with (
            stores.atomic_store(out_store, kind=stores.TILES, attrs=attrs) as group,
            stores.atomic_file(out_qc) as qc_tmp,
        ):
            if spec["store_pixels"]:
                tiles = stores.create_tiles_array(group, n_tiles=len(coords), tile_px=geometry.tile_px)
                write_in_chunks(
                    tiles, batches=read_blocks(slide, blocks=plan.blocks, geometry=geometry, threads=threads)
                )
            stores.write_array(group, "coords", coords)
            # zlib level 1: half the time of the default 6 for a ~15% larger QC image.
            qc_image(thumbnail=plan.thumbnail, mask=plan.mask, coords=coords, info=slide.info, geometry=geometry).save(
                qc_tmp, format="PNG", compress_level=1
            )
    log.info(
        "%s: %d tiles at level %d (%.3f µm/px read, %.3f target, mpp from %s)",
        slide_id,
        len(coords),
        geometry.level,
        slide.info.level_mpp(geometry.level),
        spec["target_mpp"],
        slide.info.mpp_source,
    )
    return len(coords)


def tile_shard(
    *,
    slides: Sequence[tuple[str, str, float | None]],
    spec: Mapping[str, Any],
    out_dir: str | Path,
    out_qc_dir: str | Path,
    threads: int = 1,
) -> int:
    """Tile every (slide_id, slide_path, mpp_override) of a shard into ``{out_dir}/{slide_id}.zarr``
    and ``{out_qc_dir}/{slide_id}.png``; return the tiles. Both directories appear only complete."""
    total = 0
    with stores.atomic_dir(out_dir) as tmp, stores.atomic_dir(out_qc_dir) as qc_tmp:
        for slide_id, slide_path, mpp_override in slides:
            total += tile_slide(
                slide_id=slide_id,
                slide_path=slide_path,
                spec=spec,
                out_store=stores.slide_store(tmp, slide_id),
                out_qc=Path(qc_tmp) / f"{slide_id}.png",
                mpp_override=mpp_override,
                threads=threads,
            )
    return total


def plan_tiling(slide: slides.Slide, *, spec: Mapping[str, Any], threads: int) -> TilingPlan:
    """Level and tile geometry, tissue mask on a thumbnail, kept grid cells grouped into blocks."""
    geometry = tile_geometry(slide.info, spec=spec)
    thumbnail = slide.thumbnail(thumbnail_mpp=spec["tissue"]["thumbnail_mpp"], threads=threads)
    mask = tissue_mask(slide.info, thumbnail=thumbnail, spec=spec)
    cells = tissue_cells(slide.info, mask=mask, geometry=geometry, spec=spec)
    return TilingPlan(
        geometry=geometry, thumbnail=thumbnail, mask=mask, blocks=plan_blocks(cells, block_cells=block_cells(geometry))
    )


def _no_tissue(info: slides.SlideInfo, *, spec: Mapping[str, Any]) -> str:
    """Raise for a slide without tissue, or (``skip_empty``) log it and return the skip reason."""
    what = (
        f"no {spec['tile_px']} px tile at {spec['target_mpp']} µm/px has >= {spec['tissue']['min_fraction']:.0%} tissue"
    )
    if not spec["skip_empty"]:
        raise SlideError(
            f"slide {info.slide_id!r}: no tissue found in {info.path} ({what}); check the slide, remove it from the sample sheet, or set tiling.skip_empty: true"
        )
    log.warning(
        "slide %r: no tissue found in %s (%s); writing an empty tiles store (tiling.skip_empty)",
        info.slide_id,
        info.path,
        what,
    )
    return SKIPPED_NO_TISSUE


def expected_tiles_attrs(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The attrs a tiles store must carry to match ``spec`` (pass to ``stores.require_attrs``)."""
    return {"tiling": dict(spec), "tile_px": spec["tile_px"], "target_mpp": spec["target_mpp"]}


def tiles_store_attrs(info: slides.SlideInfo, *, geometry: TileGeometry, spec: Mapping[str, Any]) -> dict[str, Any]:
    """All attrs of a tiles store: the slide's identity, how it was read, and the tiling spec."""
    level = geometry.level
    return {
        "slide_id": info.slide_id,
        "source": slides.source_identity(info.path),
        "source_mpp": info.mpp,
        "mpp_source": info.mpp_source,
        "vendor": info.vendor,
        "level": level,
        "level_downsample": info.level_downsamples[level],
        "coords_space": "level-0 pixels, (x, y) of the top-left corner",
        "geometry": geometry.describe(),
        "pixels": "stored" if spec["store_pixels"] else "read from the slide",
        **expected_tiles_attrs(spec),
    }


def tile_geometry(info: slides.SlideInfo, *, spec: Mapping[str, Any]) -> TileGeometry:
    level = slides.choose_level(info, target_mpp=spec["target_mpp"], tolerance=spec["mpp_tolerance"])
    side_level = slides.level_tile_px(
        tile_px=spec["tile_px"], target_mpp=spec["target_mpp"], level_mpp=info.level_mpp(level)
    )
    geometry = TileGeometry(
        tile_px=spec["tile_px"],
        level=level,
        downsample=info.level_downsamples[level],
        side0_px=spec["tile_px"] * spec["target_mpp"] / info.mpp,
        side_level_px=side_level,
    )
    if geometry.side0_px > min(info.width_px, info.height_px):
        raise SlideError(
            f"slide {info.slide_id!r}: at {info.mpp:g} µm/px (from {info.mpp_source}) the slide ({info.width_px} x {info.height_px} px) "
            f"is smaller than one {spec['tile_px'] * spec['target_mpp']:g} µm tile; check its resolution (sample sheet 'mpp' column)"
        )
    return geometry


def tissue_mask(info: slides.SlideInfo, *, thumbnail: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """Tissue mask of the thumbnail, with the size limits converted from µm² to thumbnail px."""
    px_area_um2 = info.mpp**2 / np.prod(mask_scale(info, thumbnail))
    limits = spec["tissue"]
    return tissue.detect_tissue(
        thumbnail,
        min_object_px=round(limits["min_object_um2"] / px_area_um2),
        max_hole_px=round(limits["max_hole_um2"] / px_area_um2),
    )


def mask_scale(info: slides.SlideInfo, image: np.ndarray) -> np.ndarray:
    """(x, y) pixels of a whole-slide thumbnail or mask per level-0 pixel."""
    return np.array([image.shape[1] / info.width_px, image.shape[0] / info.height_px])


def tissue_cells(
    info: slides.SlideInfo, *, mask: np.ndarray, geometry: TileGeometry, spec: Mapping[str, Any]
) -> np.ndarray:
    """(row, col) of the grid cells (inside the slide) with enough tissue, row-major."""
    side = geometry.side0_px
    rows, cols = int(info.height_px // side), int(info.width_px // side)
    cells = np.stack(np.mgrid[0:rows, 0:cols], axis=-1).reshape(-1, 2)
    corners = geometry.coords(cells)
    scale = mask_scale(info, mask)
    boxes = np.concatenate([np.floor(corners * scale), np.ceil((corners + side) * scale)], axis=1).astype(np.int64)
    fraction = tissue.tissue_fraction_per_box(mask, boxes)
    return cells[fraction >= spec["tissue"]["min_fraction"]]


def read_blocks(
    slide: slides.Slide, *, blocks: Iterable[Block], geometry: TileGeometry, threads: int
) -> Iterator[np.ndarray]:
    """Yield each block's kept tiles as (k, T, T, 3) uint8, in block order."""
    return slides.map_bounded(partial(read_block, slide=slide, geometry=geometry), items=blocks, threads=threads)


def read_block(block: Block, *, slide: slides.Slide, geometry: TileGeometry) -> np.ndarray:
    """One region read for the whole block, cut into its kept tiles (each resized if needed)."""
    tile, side, downsample = geometry.tile_px, geometry.side_level_px, geometry.downsample
    # The block's exact origin in level px, and the whole pixel the read starts at.
    x0, y0 = block.col0 * side, block.row0 * side
    left, top = math.floor(x0), math.floor(y0)
    location = (round(left * downsample), round(top * downsample))
    if not geometry.resized:
        pixels = slide.read_rgb(location=location, level=geometry.level, size=(block.cols * tile, block.rows * tile))
        return cut_tiles(pixels, block=block, tile_px=tile)
    region = slide.read_image(
        location=location,
        level=geometry.level,
        size=(math.ceil(x0 - left + block.cols * side), math.ceil(y0 - top + block.rows * side)),
    )
    return np.stack(
        [_resized_tile(region, row=row, col=col, origin=(left, top), geometry=geometry) for row, col in block.cells]
    )


def _resized_tile(
    region: Image.Image, *, row: int, col: int, origin: tuple[int, int], geometry: TileGeometry
) -> np.ndarray:
    """One tile resized from exactly its own window of level pixels (the whole pixels it
    overlaps): the filter never sees a neighbour's pixels, so the tile is the same whichever
    block it is read in."""
    side = geometry.side_level_px
    x0, y0 = col * side - origin[0], row * side - origin[1]
    window = (math.floor(x0), math.floor(y0), math.ceil(x0 + side), math.ceil(y0 + side))
    box = (x0 - window[0], y0 - window[1], x0 - window[0] + side, y0 - window[1] + side)
    crop = region.crop(window)
    return slides.rgb_pixels(
        crop.resize((geometry.tile_px, geometry.tile_px), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
    )


def cut_tiles(region: np.ndarray, *, block: Block, tile_px: int) -> np.ndarray:
    """The kept tiles, (k, T, T, 3), of a block's contiguous (rows * T, cols * T, 3) image."""
    # Each tile row is T * 3 contiguous bytes: viewed as wide words, numpy gathers it in a few
    # moves instead of byte by byte (3-4x faster for 224 px tiles).
    word = np.dtype(f"u{math.gcd(tile_px * 3, 8)}")
    rows = region.reshape(block.rows * tile_px, -1).view(word)
    grid = rows.reshape(block.rows, tile_px, block.cols, -1).swapaxes(1, 2)
    tiles = grid[block.cells[:, 0] - block.row0, block.cells[:, 1] - block.col0]
    return tiles.view(np.uint8).reshape(-1, tile_px, tile_px, 3)


def write_in_chunks(
    array: zarr.Array, *, batches: Iterable[np.ndarray], chunks_per_write: int | None = None, depth: int | None = None
) -> None:
    """Fill a zarr array whole chunk by whole chunk, in order (no read-modify-write).

    Tiles are gathered into slabs of ``chunks_per_write`` whole chunks; a writer thread stores
    each slab (zarr compresses its chunks concurrently) while the caller keeps gathering the
    next one, with at most ``depth`` slabs waiting, so compressing and writing overlap reading
    and memory stays at ``depth + 1`` slabs whatever the slide's size. Each chunk's bytes depend
    only on its tiles, so the store is the same whatever the timing.
    """
    chunk, depth = array.chunks[0], max(1, depth or WRITE_DEPTH)
    slab_tiles = chunk * max(1, min(chunks_per_write or WRITE_CHUNKS, math.ceil(array.shape[0] / chunk)))
    slabs = [np.empty((slab_tiles, *array.shape[1:]), dtype=np.uint8) for _ in range(depth + 1)]
    pending: deque[Future[None]] = deque()
    start = filled = n_slabs = 0

    def submit(pool: ThreadPoolExecutor, n: int) -> None:
        nonlocal start, filled, n_slabs
        if len(pending) >= depth:
            pending.popleft().result()
        pending.append(pool.submit(array.__setitem__, slice(start, start + n), slabs[n_slabs % len(slabs)][:n]))
        start, filled, n_slabs = start + n, 0, n_slabs + 1

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="zarr-writer") as pool:
        try:
            for batch in batches:
                taken = 0
                while taken < len(batch):
                    # The slab being filled was last handed to the writer len(slabs) slabs ago: done.
                    buffer = slabs[n_slabs % len(slabs)]
                    n = min(slab_tiles - filled, len(batch) - taken)
                    buffer[filled : filled + n] = batch[taken : taken + n]
                    filled, taken = filled + n, taken + n
                    if filled == slab_tiles:
                        submit(pool, slab_tiles)
            if filled:
                submit(pool, filled)
            while pending:
                pending.popleft().result()
        finally:  # on an error, let the slab being written finish and drop the queued ones
            for future in pending:
                future.cancel()
    if start != array.shape[0]:
        raise RuntimeError(f"wrote {start} tiles into an array of {array.shape[0]}")


def qc_image(
    *, thumbnail: np.ndarray, mask: np.ndarray, coords: np.ndarray, info: slides.SlideInfo, geometry: TileGeometry
) -> Image.Image:
    """Thumbnail with the tissue mask tinted green and every kept tile outlined in blue."""
    plain = Image.fromarray(thumbnail)
    tinted = Image.blend(plain, Image.new("RGB", plain.size, (0, 200, 0)), 0.3)
    canvas = Image.composite(tinted, plain, Image.fromarray(mask))
    draw = ImageDraw.Draw(canvas)
    scale = mask_scale(info, mask)
    side = geometry.side0_px * scale
    for x, y in coords * scale:
        draw.rectangle([x, y, x + side[0], y + side[1]], outline=(0, 60, 255))
    return canvas
