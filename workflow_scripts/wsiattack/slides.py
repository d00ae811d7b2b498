"""Slide access: one small interface (``Slide``) over OpenSlide, resolution (mpp), level choice.

OpenSlide reads the vendor formats (Aperio SVS, Hamamatsu, Leica, MIRAX, Philips, Sakura,
Ventana, Zeiss), DICOM WSI and generic tiled TIFF; the rest of the package only sees ``Slide``
(metadata in ``Slide.info``, RGB reads), so another backend would slot in here.

Resolution, first found wins: the sample sheet's ``mpp`` column; OpenSlide's
``openslide.mpp-x/y``; the TIFF resolution tags (``tiff.XResolution`` with a centimetre or inch
``tiff.ResolutionUnit``: vendor readers such as Aperio's ignore them); and only when allowed,
the nominal objective power (``10 / openslide.objective-power`` µm/px, a scanner-dependent guess).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import openslide
from PIL import Image

from wsiattack.errors import SlideError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# µm per unit of tiff.ResolutionUnit, as OpenSlide spells the units.
_RESOLUTION_UNIT_UM = {"centimeter": 1e4, "inch": 25400.0}
# A 10x objective images about 1 µm/px on common scanners (20x ~0.5, 40x ~0.25).
_OBJECTIVE_POWER_UM = 10.0
# Pixel-size mismatch between x and y above which a warning is logged (tiles assume square px).
_ANISOTROPY_WARN = 0.01
# Level pixels read per band when building a thumbnail (bounds memory for single-level slides).
_THUMBNAIL_BAND_PX = 1 << 22
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


@dataclass(frozen=True)
class SlideInfo:
    slide_id: str
    path: str
    width_px: int  # level 0
    height_px: int
    mpp: float  # level 0, µm per pixel (mean of x and y)
    mpp_source: str  # where ``mpp`` came from (see module docstring)
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    vendor: str

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]


class Slide:
    """An open slide: ``info`` plus RGB reads. Safe to read from several threads at once."""

    def __init__(self, handle: openslide.OpenSlide, info: SlideInfo) -> None:
        self._handle = handle
        self.info = info

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._handle.close()

    def read_image(self, *, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """RGB image of a region (``location`` in level-0 px); transparent areas become white."""
        return over_white(self._read_rgba(location=location, level=level, size=size))

    def read_rgb(self, *, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """(h, w, 3) uint8 of a region, as ``read_image`` but cheaper: the usual fully opaque
        region is packed straight from RGBA to RGB bytes, with no intermediate RGB image."""
        region = self._read_rgba(location=location, level=level, size=size)
        if _opaque(region):
            return rgb_pixels(region)
        return rgb_pixels(over_white(region))

    def _read_rgba(self, *, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        try:
            return self._handle.read_region(location, level, size)
        except openslide.OpenSlideError as error:
            raise SlideError(
                f"slide {self.info.slide_id!r}: {self.info.path} could not be decoded ({error}); the file is corrupt or truncated, re-export or re-copy it"
            ) from None

    def thumbnail(self, *, thumbnail_mpp: float, threads: int = 1) -> np.ndarray:
        """RGB image of the whole slide at about ``thumbnail_mpp`` µm/px (box-filtered).

        Read in bands from the best level, so memory stays bounded even for a slide with no
        pyramid (OpenSlide's ``get_thumbnail`` would load that whole level at once).
        """
        info = self.info
        size = (
            max(1, round(info.width_px * info.mpp / thumbnail_mpp)),
            max(1, round(info.height_px * info.mpp / thumbnail_mpp)),
        )
        scale = (info.width_px / size[0], info.height_px / size[1])  # level-0 px per thumbnail px
        level = self._handle.get_best_level_for_downsample(min(scale))
        band_rows = max(
            1, int(_THUMBNAIL_BAND_PX // (info.level_dimensions[level][0] * scale[1] / info.level_downsamples[level]))
        )
        bands = [(top, min(size[1], top + band_rows)) for top in range(0, size[1], band_rows)]
        image = np.empty((size[1], size[0], 3), dtype=np.uint8)
        render = partial(self._thumbnail_band, level=level, size=size, scale=scale)
        for (top, bottom), pixels in zip(bands, map_bounded(render, items=bands, threads=threads), strict=True):
            image[top:bottom] = pixels
        return image

    def _thumbnail_band(
        self, band: tuple[int, int], *, level: int, size: tuple[int, int], scale: tuple[float, float]
    ) -> np.ndarray:
        downsample = self.info.level_downsamples[level]
        level_width, level_height = self.info.level_dimensions[level]
        # The band in level px, clamped: OpenSlide's downsamples are rounded ratios of sizes.
        top, bottom = (min(row * scale[1] / downsample, level_height) for row in band)
        top = min(top, bottom - 0.5)
        first, last = math.floor(top), math.ceil(bottom)
        pixels = self.read_image(location=(0, round(first * downsample)), level=level, size=(level_width, last - first))
        box = (0.0, top - first, min(self.info.width_px / downsample, level_width), bottom - first)
        return np.asarray(pixels.resize((size[0], band[1] - band[0]), Image.Resampling.BOX, box=box))


def _opaque(region: Image.Image) -> bool:
    return region.getchannel("A").getextrema()[0] == 255


def rgb_pixels(image: Image.Image) -> np.ndarray:
    """(h, w, 3) uint8 of an RGB image, or of the RGB channels of an RGBA one, in one packing
    pass (``tobytes`` packs RGBA to RGB directly; ``np.asarray(image.convert("RGB"))`` costs
    about 4x more: a whole intermediate image, then a copy of it)."""
    return np.frombuffer(image.tobytes("raw", "RGB"), dtype=np.uint8).reshape(image.height, image.width, 3)


def over_white(region: Image.Image) -> Image.Image:
    """RGB of a non-premultiplied RGBA region composited over white (outside the scan is
    transparent); the usual fully opaque region is just converted, which is cheaper."""
    if _opaque(region):
        return region.convert("RGB")
    canvas = Image.new("RGB", region.size, (255, 255, 255))
    canvas.paste(region, mask=region)
    return canvas


def open_slide(
    path: str | Path, *, slide_id: str, mpp_override: float | None = None, allow_objective_power: bool = False
) -> Slide:
    """Open a slide and resolve its resolution (see the module docstring for the order)."""
    path = Path(path)
    handle = _open_handle(path, slide_id=slide_id)
    try:
        mpp, source = resolve_mpp(
            handle.properties,
            slide_id=slide_id,
            path=path,
            mpp_override=mpp_override,
            allow_objective_power=allow_objective_power,
        )
    except SlideError:
        handle.close()
        raise
    info = SlideInfo(
        slide_id=slide_id,
        path=str(path),
        width_px=handle.dimensions[0],
        height_px=handle.dimensions[1],
        mpp=mpp,
        mpp_source=source,
        level_dimensions=tuple((int(w), int(h)) for w, h in handle.level_dimensions),
        level_downsamples=tuple(float(d) for d in handle.level_downsamples),
        vendor=handle.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown"),
    )
    return Slide(handle, info)


def _open_handle(path: Path, *, slide_id: str) -> openslide.OpenSlide:
    if not path.is_file():
        raise SlideError(f"slide {slide_id!r}: file not found: {path}; fix its 'path' in the sample sheet")
    try:
        return openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(f"slide {slide_id!r}: {_unsupported_reason(path)}") from None
    except openslide.OpenSlideError as error:
        raise SlideError(
            f"slide {slide_id!r}: {path} is unreadable ({error}); the file is corrupt or truncated, re-export or re-copy it"
        ) from None


def _unsupported_reason(path: Path) -> str:
    """Tell a damaged TIFF (a real slide, cut short) from a file that is not a slide at all."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head in _TIFF_MAGICS:
        return f"{path} is a TIFF file that OpenSlide cannot open: it is truncated or corrupt (re-copy it), or not a tiled, pyramidal slide"
    return f"{path} is not a slide format OpenSlide can read (e.g. .svs, .tif(f), .ndpi, .mrxs, .scn, .bif, DICOM)"


def resolve_mpp(
    properties: Mapping[str, str],
    *,
    slide_id: str,
    path: str | Path,
    mpp_override: float | None,
    allow_objective_power: bool,
) -> tuple[float, str]:
    """Level-0 µm per pixel and where it came from; raises SlideError when there is none."""
    if mpp_override is not None:
        if not (math.isfinite(mpp_override) and mpp_override > 0):
            raise SlideError(
                f"slide {slide_id!r}: the sample sheet's mpp {mpp_override!r} is not a positive number; fix it or leave it empty"
            )
        return float(mpp_override), "sample sheet"
    for source, reader in (("openslide.mpp-x/y", _openslide_mpp), ("tiff.XResolution/YResolution", _tiff_mpp)):
        pair = reader(properties)
        if pair is not None:
            return _mean_mpp(pair, slide_id=slide_id, source=source), source
    power = _positive(properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
    if power is None:
        raise SlideError(
            f"slide {slide_id!r}: {path} has no resolution metadata (openslide.mpp-x/y or TIFF resolution tags); add an 'mpp' column (µm per pixel at level 0) to the sample sheet for this slide"
        )
    guess = _OBJECTIVE_POWER_UM / power
    if not allow_objective_power:
        raise SlideError(
            f"slide {slide_id!r}: {path} has no pixel size, only an objective power ({power:g}x); add an 'mpp' column "
            f"(µm per pixel at level 0) to the sample sheet for this slide, or set tiling.allow_objective_power: true to assume {guess:g} µm/px"
        )
    log.warning(
        "slide %r: no pixel size in %s; assuming %g µm/px from its objective power %gx (tiling.allow_objective_power); set the sample sheet's 'mpp' column for the exact value",
        slide_id,
        path,
        guess,
        power,
    )
    return guess, "openslide.objective-power"


def _positive(text: str | None) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _openslide_mpp(properties: Mapping[str, str]) -> tuple[float, float] | None:
    mpp_x = _positive(properties.get(openslide.PROPERTY_NAME_MPP_X))
    mpp_y = _positive(properties.get(openslide.PROPERTY_NAME_MPP_Y))
    return None if mpp_x is None or mpp_y is None else (mpp_x, mpp_y)


def _tiff_mpp(properties: Mapping[str, str]) -> tuple[float, float] | None:
    """From the TIFF resolution tags (pixels per unit); ``none`` units carry no physical size."""
    unit_um = _RESOLUTION_UNIT_UM.get(properties.get("tiff.ResolutionUnit", "").lower())
    x_res, y_res = _positive(properties.get("tiff.XResolution")), _positive(properties.get("tiff.YResolution"))
    if unit_um is None or x_res is None or y_res is None:
        return None
    return unit_um / x_res, unit_um / y_res


def _mean_mpp(pair: tuple[float, float], *, slide_id: str, source: str) -> float:
    mpp_x, mpp_y = pair
    if abs(mpp_x - mpp_y) > _ANISOTROPY_WARN * max(mpp_x, mpp_y):
        log.warning(
            "slide %r: non-square pixels (%s: %g x %g µm); tiles use their mean", slide_id, source, mpp_x, mpp_y
        )
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
            f"slide {info.slide_id!r}: its finest resolution ({info.mpp:.3g} µm/px, from {info.mpp_source}) is coarser than "
            f"the target {target_mpp} µm/px; if that resolution is wrong set the slide's 'mpp' column in the sample sheet, "
            "otherwise raise tiling.target_mpp or remove the slide"
        )
    return max(candidates, key=info.level_mpp)


def level_tile_px(*, tile_px: int, target_mpp: float, level_mpp: float) -> float:
    """Side, in pixels of the level read, of a tile covering ``tile_px`` pixels at the target mpp."""
    side = tile_px * target_mpp / level_mpp
    return float(round(side)) if math.isclose(side, round(side), rel_tol=1e-6) else side


def map_bounded(function: Callable[[T], R], *, items: Iterable[T], threads: int) -> Iterator[R]:
    """``map`` over a thread pool, results in input order, at most ``2 * threads`` in flight.

    OpenSlide, Pillow and numpy release the GIL while decoding or resizing, so threads scale;
    the bound keeps memory independent of the number of items. ``threads=1`` runs inline.
    """
    if threads <= 1:
        yield from map(function, items)
        return
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        try:
            for item in items:
                if len(pending) >= 2 * threads:
                    yield pending.popleft().result()
                pending.append(pool.submit(function, item))
            while pending:
                yield pending.popleft().result()
        finally:  # an error (or an abandoned consumer) must not wait for the queued reads
            for future in pending:
                future.cancel()


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
