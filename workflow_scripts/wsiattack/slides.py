"""Slide access: one small interface over OpenSlide, resolution (mpp) and pyramid-level choice."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from wsiattack.errors import SlideError


@dataclass(frozen=True)
class SlideInfo:
    slide_id: str
    path: str
    width_px: int  # level 0
    height_px: int
    mpp: float  # level 0, µm per pixel (mean of x and y)
    level_downsamples: tuple[float, ...]
    vendor: str

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]


def open_slide(path: str | Path, *, slide_id: str, mpp_override: float | None = None) -> tuple[openslide.OpenSlide, SlideInfo]:
    """Open a slide and read its resolution; ``mpp_override`` (sample sheet ``mpp``) wins."""
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"slide {slide_id!r}: file not found: {path}")
    try:
        slide = openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(f"slide {slide_id!r}: {path} is not a slide format OpenSlide can read") from None
    except openslide.OpenSlideError as error:
        raise SlideError(f"slide {slide_id!r}: {path} is unreadable ({error})") from None
    mpp = mpp_override if mpp_override is not None else _metadata_mpp(slide)
    if mpp is None or not mpp > 0:
        slide.close()
        raise SlideError(
            f"slide {slide_id!r}: {path} has no resolution metadata (openslide.mpp-x/y); "
            "add an 'mpp' column (µm per pixel at level 0) to the sample sheet for this slide"
        )
    width, height = slide.dimensions
    info = SlideInfo(
        slide_id=slide_id,
        path=str(path),
        width_px=width,
        height_px=height,
        mpp=float(mpp),
        level_downsamples=tuple(float(d) for d in slide.level_downsamples),
        vendor=slide.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown"),
    )
    return slide, info


def _metadata_mpp(slide: openslide.OpenSlide) -> float | None:
    props = slide.properties
    try:
        mpp_x = float(props[openslide.PROPERTY_NAME_MPP_X])
        mpp_y = float(props[openslide.PROPERTY_NAME_MPP_Y])
    except (KeyError, ValueError):
        return None
    return (mpp_x + mpp_y) / 2


def choose_level(info: SlideInfo, *, target_mpp: float, tolerance: float) -> int:
    """The coarsest level whose mpp does not exceed the target (within a relative tolerance).

    Reading finer than needed and resizing down keeps every tile's physical size exact; a level
    coarser than the target would need upsampling, which invents detail, so it is never chosen.
    """
    limit = target_mpp * (1 + tolerance)
    candidates = [lvl for lvl in range(len(info.level_downsamples)) if info.level_mpp(lvl) <= limit]
    if not candidates:
        raise SlideError(
            f"slide {info.slide_id!r}: its finest resolution ({info.mpp:.3g} µm/px) is coarser than "
            f"the target {target_mpp} µm/px; lower tiling.target_mpp or exclude the slide"
        )
    return max(candidates, key=info.level_mpp)


def thumbnail(slide: openslide.OpenSlide, info: SlideInfo, *, thumbnail_mpp: float) -> tuple[np.ndarray, float]:
    """RGB thumbnail at about ``thumbnail_mpp`` µm/px; returns it and its exact mpp (x axis)."""
    width = max(1, round(info.width_px * info.mpp / thumbnail_mpp))
    height = max(1, round(info.height_px * info.mpp / thumbnail_mpp))
    try:
        image = slide.get_thumbnail((width, height)).convert("RGB")
    except openslide.OpenSlideError as error:
        raise SlideError(f"slide {info.slide_id!r}: {info.path} could not be decoded ({error})") from None
    return np.asarray(image), info.width_px * info.mpp / image.width


def read_rgb(slide: openslide.OpenSlide, info: SlideInfo, *, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
    """Read a region as RGB uint8; areas outside the scanned region become white, not black."""
    try:
        region = slide.read_region(location, level, size)
    except openslide.OpenSlideError as error:
        raise SlideError(f"slide {info.slide_id!r}: {info.path} could not be decoded ({error})") from None
    white = Image.new("RGBA", region.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, region).convert("RGB"))


def source_identity(path: str | Path) -> dict[str, object]:
    """Cheap, content-based identity of a slide file: size plus a hash of its first and last MiB.

    Stored in the tiles store so that a replaced slide is noticed; unlike an mtime it is the same
    on every machine, so identical inputs give identical stores.
    """
    path = Path(path)
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(max(0, size - (1 << 20)))
        digest.update(handle.read(1 << 20))
    return {"path": str(path), "size_bytes": size, "sha256_head_tail": digest.hexdigest()}


def level_tile_px(*, tile_px: int, target_mpp: float, level_mpp: float) -> float:
    """Side, in pixels of the level read, of a tile covering ``tile_px`` pixels at the target mpp."""
    side = tile_px * target_mpp / level_mpp
    return float(round(side)) if math.isclose(side, round(side), rel_tol=1e-6) else side
