"""Composition of a synthetic slide: Beer-Lambert staining of the fields into RGB (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from wsiattack.synthetic.fields import (
    _CHUNK_ROWS,
    _LOWRES_FACTOR,
    _TEXTURE_PX,
    _fibre_texture,
    _nucleus_kernels,
    _sample_in_grid,
    _smooth_noise,
    _stamp,
    _tissue_mask,
    _tumor_mask,
    _upsample_chunk,
)

# Beer-Lambert calibration (see module docstring). I0 is the glass (background) intensity.
_I0_RGB = np.array([242.0, 241.0, 243.0])
_STROMA_RGB = np.array([230.0, 160.0, 190.0])
_NUCLEUS_RGB = np.array([90.0, 60.0, 140.0])
_OD_EOSIN = -np.log(_STROMA_RGB / _I0_RGB)  # c_E = 1 gives stroma
_OD_HAEM = -np.log(_NUCLEUS_RGB / _I0_RGB) - _OD_EOSIN  # c_H = 1 on stroma gives a nucleus
# Tumour regions: nucleus kernels 1.2x stronger than normal ones, plus extra haematoxylin
# (purple stroma) and eosin (denser tissue) in the whole region. Together they put tumour nuclei
# near RGB (56, 35, 117) (aim: about (60, 30, 110)) and the stroma between them near
# (170, 110, 165).
_TUMOR_NUCLEUS_H = 1.2
_TUMOR_STROMA_H = 0.28
_TUMOR_EOSIN_GAIN = 0.15
# Concentration noise (std): gives the background (c = 0) its slight grain of ~1-2 grey levels.
_GRAIN_E, _GRAIN_H = 0.012, 0.006
# Lookup-table grids (low, high, steps) for c_E and c_H; steps keep quantisation below ~1 level.
_LUT_E = (-0.08, 2.6, 384)
_LUT_H = (-0.05, 2.9, 512)


def _stain_lut(od_eosin: np.ndarray, od_haem: np.ndarray) -> np.ndarray:
    """(N_E * N_H, 3) uint8 table: RGB for every (c_E, c_H) grid point (Beer-Lambert)."""
    c_e = np.linspace(*_LUT_E[:2], _LUT_E[2])
    c_h = np.linspace(*_LUT_H[:2], _LUT_H[2])
    od = c_e[:, None, None] * od_eosin + c_h[None, :, None] * od_haem
    rgb = _I0_RGB * np.exp(-od)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8).reshape(-1, 3)


def _quantise(values: np.ndarray, grid: tuple[float, float, int]) -> np.ndarray:
    """Nearest LUT index of ``values`` (float32, modified in place) on ``grid``, as int32."""
    low, high, steps = grid
    values -= low
    values *= np.float32((steps - 1) / (high - low))
    values += np.float32(0.5)
    np.clip(values, 0, steps - 1, out=values)
    return values.astype(np.int32)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedSlide:
    """A rendered level-0 image with the ground truth it was drawn from (per-tile labels)."""

    image: np.ndarray  # (H, W, 3) uint8
    tissue: np.ndarray  # (H, W) bool: inside the tissue section
    tumor: np.ndarray  # (H, W) bool: inside a tumour region (all False for tumor=False)


def render_slide(
    *,
    rng: np.random.Generator,
    width_px: int,
    height_px: int,
    tumor: bool,
    tumor_share: float = 0.08,
) -> np.ndarray:
    """Render one H&E-like level-0 image as a (height_px, width_px, 3) uint8 array.

    ``tumor=True`` adds 2-4 tumour regions covering ``tumor_share`` of the tissue. The tumour
    uses its own random stream, so for the same ``rng`` state the ``tumor=False`` rendering is
    identical outside the tumour regions.
    """
    image, _, _ = _render(rng=rng, width_px=width_px, height_px=height_px, tumor=tumor, tumor_share=tumor_share)
    return image


def render_slide_with_masks(
    *,
    rng: np.random.Generator,
    width_px: int,
    height_px: int,
    tumor: bool,
    tumor_share: float = 0.08,
) -> RenderedSlide:
    """``render_slide``'s image (the same bytes for the same arguments) and its level-0 masks.

    The masks are the low-resolution tissue and tumour fields the image was composed from,
    nearest-upsampled (level-0 pixel (y, x) lies in cell (y // 4, x // 4)); edges blur over a few
    pixels in the image, so a tile's mask fraction is exact to within that margin.
    """
    image, tissue_low, tumor_low = _render(
        rng=rng, width_px=width_px, height_px=height_px, tumor=tumor, tumor_share=tumor_share
    )
    return RenderedSlide(
        image=image,
        tissue=_upsample_mask(tissue_low, image.shape[:2]),
        tumor=_upsample_mask(tumor_low, image.shape[:2]),
    )


def _upsample_mask(mask: np.ndarray, shape_px: tuple[int, int]) -> np.ndarray:
    f = _LOWRES_FACTOR
    return np.repeat(np.repeat(mask, f, axis=0), f, axis=1)[: shape_px[0], : shape_px[1]]


def _render(
    *, rng: np.random.Generator, width_px: int, height_px: int, tumor: bool, tumor_share: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The level-0 image and the low-res tissue and tumour masks it was composed from."""
    if width_px < 64 or height_px < 64:
        raise ValueError(f"slide must be at least 64x64 px, got {width_px}x{height_px}")
    if not 0.0 < tumor_share < 0.5:
        raise ValueError(f"tumor_share must be in (0, 0.5), got {tumor_share}")
    # Independent child streams: drawing (or not drawing) the tumour never shifts the others.
    rng_tissue, rng_stain, rng_texture, rng_nuclei, rng_tumor = (
        np.random.default_rng(int(s)) for s in rng.integers(0, 2**63 - 1, size=5)
    )
    f = _LOWRES_FACTOR
    shape_px = (height_px, width_px)
    low_shape = (-(-height_px // f), -(-width_px // f))
    side = max(low_shape)

    # --- Geometry (low res) ---------------------------------------------------------------------
    tissue = _tissue_mask(
        rng_tissue,
        low_shape,
        coverage=rng_tissue.uniform(0.42, 0.58),
        n_pieces=int(rng_tissue.integers(1, 3)),
    )
    tumor_low = _tumor_mask(rng_tumor, tissue, tumor_share=tumor_share) if tumor else np.zeros(low_shape, dtype=bool)

    # --- Stain (low res): same distributions for both classes ----------------------------------
    od_eosin = _OD_EOSIN * rng_stain.uniform(0.9, 1.1, size=3)
    od_haem = _OD_HAEM * rng_stain.uniform(0.92, 1.08, size=3)
    haem_level = rng_stain.uniform(0.9, 1.1)
    eosin = rng_stain.uniform(0.8, 1.15) * (
        1.0
        + 0.12 * _smooth_noise(rng_stain, low_shape, side / 8)
        + 0.06 * _smooth_noise(rng_stain, low_shape, side / 40)
    )
    haem_bg = 0.04 + 0.02 * _smooth_noise(rng_stain, low_shape, side / 10)
    # Tumour stroma: more purple and a little denser; soft boundary.
    tumor_soft = ndimage.gaussian_filter(tumor_low.astype(np.float32), sigma=1.5)
    eosin *= 1.0 + _TUMOR_EOSIN_GAIN * tumor_soft
    haem_bg += _TUMOR_STROMA_H * tumor_soft
    alpha = ndimage.gaussian_filter(tissue.astype(np.float32), sigma=0.8)  # soft tissue edge
    c_e_low = np.pad(alpha * eosin, 1, mode="edge").astype(np.float32)
    c_h_low = np.pad(alpha * haem_level * haem_bg, 1, mode="edge").astype(np.float32)

    # --- Nuclei (level 0, haematoxylin concentration) ------------------------------------------
    haem_nuclei = np.zeros(shape_px, dtype=np.float32)
    # Normal nuclei: density varies smoothly (cellular vs. sparse stroma) and between slides.
    px_per_nucleus = rng_nuclei.uniform(600.0, 1100.0)
    density = np.clip(1.0 + 0.5 * _smooth_noise(rng_nuclei, low_shape, side / 15), 0.15, None)
    n_normal = int(tissue.sum() * f * f / px_per_nucleus)
    ys, xs = _sample_in_grid(rng_nuclei, tissue * density, n=n_normal, factor=f, shape_px=shape_px)
    kernels = _nucleus_kernels(
        rng_nuclei, n=64, diameter_px=(6.0, 14.0), aspect=(0.45, 0.95), strength=(0.8 * haem_level, 1.15 * haem_level)
    )
    _stamp(haem_nuclei, kernels, ys, xs, rng_nuclei.integers(0, len(kernels), size=ys.size))
    if tumor:
        # Tumour nuclei on a jittered grid (packed sheets rather than random clumps), larger,
        # rounder and darker.
        spacing = rng_tumor.uniform(13.0, 16.0)
        gy, gx = np.mgrid[0:height_px:spacing, 0:width_px:spacing]
        gy = np.clip((gy + rng_tumor.uniform(-0.35, 0.35, gy.shape) * spacing).round(), 0, height_px - 1).astype(
            np.int64
        )
        gx = np.clip((gx + rng_tumor.uniform(-0.35, 0.35, gx.shape) * spacing).round(), 0, width_px - 1).astype(
            np.int64
        )
        inside = tumor_low[gy // f, gx // f] & (rng_tumor.random(gy.shape) < 0.85)
        t_kernels = _nucleus_kernels(
            rng_tumor,
            n=64,
            diameter_px=(12.0, 22.0),
            aspect=(0.7, 1.0),
            strength=(0.85 * _TUMOR_NUCLEUS_H * haem_level, 1.1 * _TUMOR_NUCLEUS_H * haem_level),
        )
        _stamp(
            haem_nuclei,
            t_kernels,
            gy[inside],
            gx[inside],
            rng_tumor.integers(0, len(t_kernels), size=int(inside.sum())),
        )

    # --- Textures: periodic patches, tiled to the slide width once ------------------------------
    size = _TEXTURE_PX
    reps = -(-width_px // size)
    fibres = np.clip(1.0 + 0.28 * _fibre_texture(rng_texture, size), 0.35, 1.6)
    fibres = np.tile(fibres, (1, reps))[:, :width_px].copy()
    grain = np.tile(rng_texture.standard_normal((size, size), dtype=np.float32), (1, reps))
    grain = grain[:, :width_px].copy()

    # --- Compose row chunks: concentrations -> LUT ----------------------------------------------
    lut = _stain_lut(od_eosin, od_haem)
    n_h = _LUT_H[2]
    image = np.empty((height_px, width_px, 3), dtype=np.uint8)
    for row0 in range(0, height_px, _CHUNK_ROWS):
        n_rows = min(_CHUNK_ROWS, height_px - row0)
        t0 = row0 % size
        t1 = (t0 + size // 2) % size  # other grain rows for c_H, so the two are uncorrelated
        c_e = _upsample_chunk(c_e_low, row0, n_rows, width_px, f)
        c_e *= fibres[t0 : t0 + n_rows]
        c_e += _GRAIN_E * grain[t0 : t0 + n_rows]
        c_h = _upsample_chunk(c_h_low, row0, n_rows, width_px, f)
        c_h += haem_nuclei[row0 : row0 + n_rows]
        c_h += _GRAIN_H * grain[t1 : t1 + n_rows]
        index = _quantise(c_e, _LUT_E)
        index *= n_h
        index += _quantise(c_h, _LUT_H)
        np.take(lut, index, axis=0, out=image[row0 : row0 + n_rows], mode="clip")
    return image, tissue, tumor_low


def _downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Box-filter downsample by an integer ``factor``; edges padded so size is ceil(n/factor)."""
    if factor == 1:
        return image
    h, w = image.shape[:2]
    pad_h, pad_w = (-h) % factor, (-w) % factor
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    hh, ww = image.shape[0] // factor, image.shape[1] // factor
    blocks = image.reshape(hh, factor, ww, factor, 3)
    # uint32 sums are exact and faster than float means; round half up.
    total = blocks.sum(axis=(1, 3), dtype=np.uint32)
    n = factor * factor
    return ((total + n // 2) // n).astype(np.uint8)
