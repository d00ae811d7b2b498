"""Tiling: tissue grid at the target resolution -> tiles store + QC thumbnail.

Resolution handling: every tile covers ``tile_px * target_mpp`` µm whatever the scanner. The
pyramid level read is the coarsest one not coarser than the target (``slides.choose_level``);
when its mpp differs from the target the region is resized to ``tile_px``. Coordinates are
always level-0 pixels of the tile's top-left corner.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from wsiattack import slides, stores, tissue

log = logging.getLogger(__name__)


def tile_slide(
    *,
    slide_id: str,
    slide_path: str | Path,
    spec: Mapping[str, Any],
    out_store: str | Path,
    out_qc: str | Path,
    mpp_override: float | None = None,
) -> int:
    """Tile one slide into ``out_store`` (tiles store) and ``out_qc`` (PNG); return the tile count."""
    slide, info = slides.open_slide(slide_path, slide_id=slide_id, mpp_override=mpp_override)
    with slide:
        level = slides.choose_level(info, target_mpp=spec["target_mpp"], tolerance=spec["mpp_tolerance"])
        tissue_spec = spec["tissue"]
        thumb, thumb_mpp = slides.thumbnail(slide, info, thumbnail_mpp=tissue_spec["thumbnail_mpp"])
        mask = tissue.detect_tissue(thumb, min_object_px=round(tissue_spec["min_object_um2"] / thumb_mpp**2))
        coords = tissue_grid(info, mask=mask, mask_mpp=thumb_mpp, spec=spec)
        if len(coords) == 0:
            raise slides.SlideError(
                f"slide {slide_id!r}: no tissue found in {slide_path} "
                f"(no {spec['tile_px']} px tile at {spec['target_mpp']} µm/px has "
                f">= {tissue_spec['min_fraction']:.0%} tissue); check the slide or remove it from the sample sheet"
            )
        attrs = tiles_store_attrs(info, level=level, spec=spec)
        with stores.atomic_store(out_store, kind=stores.TILES, attrs=attrs) as group:
            tiles = stores.create_tiles_array(group, n_tiles=len(coords), tile_px=spec["tile_px"])
            _write_in_chunks(tiles, read_tiles(slide, info, coords=coords, level=level, spec=spec))
            stores.write_array(group, "coords", coords)
    write_qc_png(out_qc, thumbnail=thumb, mask=mask, coords=coords, thumb_mpp=thumb_mpp, info=info, spec=spec)
    log.info("%s: %d tiles at level %d (%.3f µm/px read, %.3f target)", slide_id, len(coords), level, info.level_mpp(level), spec["target_mpp"])
    return len(coords)


def tiles_store_attrs(info: slides.SlideInfo, *, level: int, spec: Mapping[str, Any]) -> dict[str, Any]:
    """What downstream rules check before trusting a tiles store (``stores.require_attrs``)."""
    return {
        "slide_id": info.slide_id,
        "source": slides.source_identity(info.path),
        "source_mpp": info.mpp,
        "vendor": info.vendor,
        "level": level,
        "level_downsample": info.level_downsamples[level],
        "tiling": dict(spec),
        "tile_px": spec["tile_px"],
        "target_mpp": spec["target_mpp"],
        "coords_space": "level-0 pixels, (x, y) of the top-left corner",
    }


def tile_side_level0(info: slides.SlideInfo, spec: Mapping[str, Any]) -> float:
    return spec["tile_px"] * spec["target_mpp"] / info.mpp


def tissue_grid(info: slides.SlideInfo, *, mask: np.ndarray, mask_mpp: float, spec: Mapping[str, Any]) -> np.ndarray:
    """Level-0 (x, y) of the non-overlapping grid tiles with enough tissue, row-major."""
    side = tile_side_level0(info, spec)
    cols, rows = int(info.width_px // side), int(info.height_px // side)
    grid_y, grid_x = np.mgrid[0:rows, 0:cols]
    coords = np.stack([np.round(grid_x.ravel() * side), np.round(grid_y.ravel() * side)], axis=1).astype(np.int64)
    scale = info.mpp / mask_mpp  # level-0 px -> mask px
    boxes = np.concatenate([np.floor(coords * scale), np.ceil((coords + side) * scale)], axis=1).astype(np.int64)
    fraction = tissue.tissue_fraction_per_box(mask, boxes)
    return coords[fraction >= spec["tissue"]["min_fraction"]]


def read_tiles(slide, info: slides.SlideInfo, *, coords: np.ndarray, level: int, spec: Mapping[str, Any]) -> Iterator[np.ndarray]:
    """Yield tiles (T, T, 3) in ``coords`` order, reading one region per grid row (not per tile)."""
    tile_px = spec["tile_px"]
    downsample = info.level_downsamples[level]
    side_level = slides.level_tile_px(tile_px=tile_px, target_mpp=spec["target_mpp"], level_mpp=info.level_mpp(level))
    read_px = math.ceil(side_level)
    for y in np.unique(coords[:, 1]):
        row = coords[coords[:, 1] == y]
        x_start = int(row[0, 0])
        width = math.ceil((row[-1, 0] - x_start) / downsample) + read_px
        region = slides.read_rgb(slide, info, location=(x_start, int(y)), level=level, size=(width, read_px))
        for x in row[:, 0]:
            offset = round((x - x_start) / downsample)
            tile = region[:, offset : offset + read_px]
            if read_px != tile_px or side_level != read_px:
                box = (0, 0, side_level, side_level)
                tile = np.asarray(Image.fromarray(tile).resize((tile_px, tile_px), Image.Resampling.BILINEAR, box=box, reducing_gap=None))
            yield tile


def _write_in_chunks(array, tiles: Iterator[np.ndarray]) -> None:
    """Fill a zarr array one whole chunk at a time (no read-modify-write, memory bounded)."""
    chunk = array.chunks[0]
    buffer = np.empty((chunk, *array.shape[1:]), dtype=np.uint8)
    start = filled = 0
    for tile in tiles:
        buffer[filled] = tile
        filled += 1
        if filled == chunk:
            array[start : start + chunk] = buffer
            start, filled = start + chunk, 0
    if filled:
        array[start : start + filled] = buffer[:filled]


def write_qc_png(path: str | Path, *, thumbnail: np.ndarray, mask: np.ndarray, coords: np.ndarray, thumb_mpp: float, info: slides.SlideInfo, spec: Mapping[str, Any]) -> None:
    """Thumbnail with the tissue mask tinted green and every kept tile outlined in blue."""
    image = thumbnail.astype(np.float32)
    image[mask] = 0.7 * image[mask] + 0.3 * np.array([0, 200, 0])
    canvas = Image.fromarray(image.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    scale = info.mpp / thumb_mpp
    side = tile_side_level0(info, spec) * scale
    for x, y in coords * scale:
        draw.rectangle([x, y, x + side, y + side], outline=(0, 60, 255))
    with stores.atomic_file(path) as tmp:
        canvas.save(tmp, format="PNG")
