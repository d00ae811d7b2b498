"""Synthetic H&E-like whole-slide images for the demo cohort.

The demo cohort lets the whole workflow run without real data. Each slide is a pyramidal, tiled,
JPEG-compressed RGB TIFF that OpenSlide opens with its ``generic-tiff`` reader (vendor
``generic-tiff``; ``openslide.mpp-x``/``-y`` come from the TIFF XResolution/YResolution tags).

The two classes differ only *locally*, like lymph-node metastasis detection: positive slides carry
2-4 small "tumour" regions (dense, large, dark nuclei on purplish stroma) covering
``tumor_share`` of the tissue; everything else (tissue amount and shape, stain, nucleus density)
is drawn from the same distributions for both classes. ``render_slide`` goes further: the tumour
is drawn from its own random stream, so the same generator state rendered with ``tumor=True``
and ``tumor=False`` gives images that are identical outside the tumour regions.

Colour model: Beer-Lambert optical density, ``I = I0 * exp(-(c_E * OD_E + c_H * OD_H))``, with
the eosin/haematoxylin OD vectors calibrated so that stroma comes out near RGB (230, 160, 190) and
a nucleus near (90, 60, 140). Mixing stains in OD space is what makes overlaps look like H&E. The
per-pixel work is two concentration maps and one lookup into a per-slide (c_E, c_H) -> RGB table,
which keeps a 5600 x 4480 slide to about a second on one core.

Everything is deterministic: same arguments -> byte-identical files (tifffile writes no DateTime
tag unless asked to and, with ``metadata=None``, no JSON ImageDescription).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import scipy.fft
import tifffile
from scipy import ndimage

from wsiattack.atomic import atomic_file
from wsiattack.errors import ConfigError
from wsiattack.tissue import fill_small_holes

logger = logging.getLogger(__name__)

SAMPLE_COLUMNS = ("slide_id", "path", "label")

# Smooth fields (tissue mask, stain, tumour regions) live on a grid this many times coarser than
# level 0 and are bilinearly upsampled while composing.
_LOWRES_FACTOR = 4
# Level-0 rows composed at a time: keeps the float32 temporaries in cache. Must be a multiple of
# _LOWRES_FACTOR and divide _TEXTURE_PX (so a chunk never wraps around the texture patch).
_CHUNK_ROWS = 256
# Side of the periodic fibre/grain texture patches tiled over the slide.
_TEXTURE_PX = 1024

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

# Random-stream tags for write_demo_cohort: (seed, tag, ...) keeps the slide and label streams
# apart (SeedSequence([s]) == SeedSequence([s, 0]), so a bare trailing index would be unsafe).
_SLIDE_STREAM = 1
_LABEL_STREAM = 2
_SHARE_STREAM = 4  # a positive slide's tumour share
# Tag of the slides the trained demo encoder learns from (wsiattack.encoders.demo_training):
# never the cohort's, so the encoder has not seen the slides it is evaluated on.
ENCODER_TRAINING_STREAM = 3


# --------------------------------------------------------------------------------------------
# Random fields and geometry
# --------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], feature_px: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field of ``shape`` with blobs about ``feature_px`` wide.

    White noise on a grid ``feature_px`` coarser, cubic-spline upsampled to an intermediate grid
    and then bilinearly to ``shape``: much cheaper than a large Gaussian filter at full size.
    """
    feature_px = max(float(feature_px), 1.0)
    # Final bilinear step q: features stay >= ~6 cells wide on the intermediate grid, so the
    # piecewise-linear interpolation is invisible.
    q = int(max(1, min(4, feature_px // 6)))
    mid_shape = (-(-shape[0] // q), -(-shape[1] // q))
    step = feature_px / q
    coarse_shape = (int(np.ceil(mid_shape[0] / step)) + 4, int(np.ceil(mid_shape[1] / step)) + 4)
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape), sigma=0.7)
    field = ndimage.zoom(coarse.astype(np.float32), step, order=3, mode="nearest")
    field = field[: mid_shape[0], : mid_shape[1]]
    if q > 1:
        field = ndimage.zoom(field, q, order=1, mode="nearest", grid_mode=True)
    field = field[: shape[0], : shape[1]].astype(np.float32)
    field -= field.mean()
    field /= field.std() + 1e-8
    return field


def _periodic_noise(
    rng: np.random.Generator,
    size: int,
    *,
    along_px: float,
    across_px: float,
    angle_rad: float = 0.0,
) -> np.ndarray:
    """Periodic (seamlessly tileable) Gaussian-filtered noise, optionally anisotropic; unit std.

    Filtering in the Fourier domain makes the patch periodic by construction, and the filter can
    be elongated along any angle (fibres) at no extra cost.
    """
    spectrum = scipy.fft.rfft2(rng.standard_normal((size, size), dtype=np.float32))
    ky = scipy.fft.fftfreq(size).astype(np.float32)[:, None]
    kx = scipy.fft.rfftfreq(size).astype(np.float32)[None, :]
    k_along = kx * np.cos(angle_rad) + ky * np.sin(angle_rad)
    k_across = -kx * np.sin(angle_rad) + ky * np.cos(angle_rad)
    gain = np.exp(-2 * np.pi**2 * (along_px**2 * k_along**2 + across_px**2 * k_across**2))
    field = scipy.fft.irfft2(spectrum * gain.astype(np.float32), s=(size, size))
    field -= field.mean()
    field /= field.std() + 1e-8
    return field.astype(np.float32)


def _fibre_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Periodic patch of stroma fibres (unit std) whose orientation drifts across the patch."""
    base = rng.uniform(0.0, np.pi)
    angles = [base + k * np.pi / 3 for k in range(3)]
    # Independent noise per orientation: where two directions blend they cross-hatch rather than
    # show the same speckle smeared two ways.
    components = [_periodic_noise(rng, size, along_px=8.0, across_px=1.0, angle_rad=a) for a in angles]
    # Soft-max blend weights from smooth periodic fields: regions of one fibre direction with
    # gradual turns between them (a crude version of collagen bundles).
    logits = [_periodic_noise(rng, size, along_px=130.0, across_px=130.0) for _ in angles]
    weights = np.exp(1.8 * np.stack(logits))
    weights /= weights.sum(axis=0)
    texture = np.einsum("kij,kij->ij", weights, np.stack(components))
    texture -= texture.mean()
    texture /= texture.std() + 1e-8
    return texture.astype(np.float32)


def _rough_ellipse(
    yy: np.ndarray, xx: np.ndarray, *, cy: float, cx: float, ry: float, rx: float, angle_rad: float
) -> np.ndarray:
    """``1 - r**2`` for the normalised radius ``r`` of a rotated ellipse (positive inside)."""
    cos_a, sin_a = np.cos(angle_rad), np.sin(angle_rad)
    dy, dx = yy - cy, xx - cx
    u = (dx * cos_a + dy * sin_a) / rx
    v = (-dx * sin_a + dy * cos_a) / ry
    return 1.0 - (u * u + v * v)


def _tissue_mask(rng: np.random.Generator, shape: tuple[int, int], *, coverage: float, n_pieces: int) -> np.ndarray:
    """Low-res boolean mask of ``n_pieces`` irregular tissue pieces covering about ``coverage``."""
    h, w = shape
    yy, xx = np.ogrid[0:h, 0:w]
    yy = yy.astype(np.float32) / h
    xx = xx.astype(np.float32) / w
    # Each piece is a rough ellipse (in its own half of the slide when there are two, so they
    # rarely merge); smooth noise at three scales then makes the outline irregular.
    score = np.full(shape, -np.inf, dtype=np.float32)
    for i in range(n_pieces):
        if n_pieces == 1:
            cx, rx = rng.uniform(0.45, 0.55), rng.uniform(0.36, 0.46)
        else:
            cx, rx = (0.27 if i == 0 else 0.73) + rng.uniform(-0.03, 0.03), rng.uniform(0.2, 0.24)
        cy, ry = rng.uniform(0.45, 0.55), rng.uniform(0.32, 0.44)
        angle = rng.uniform(-0.4, 0.4)
        np.maximum(score, _rough_ellipse(yy, xx, cy=cy, cx=cx, ry=ry, rx=rx, angle_rad=angle), out=score)
    side = max(h, w)
    score += 0.45 * _smooth_noise(rng, shape, side / 6)
    score += 0.15 * _smooth_noise(rng, shape, side / 25)
    score += 0.05 * _smooth_noise(rng, shape, side / 90)
    # Keep a margin of glass around the section (a cut-off piece would look like a cropping bug).
    to_edge = np.minimum(np.minimum(yy, 1.0 - yy) * h, np.minimum(xx, 1.0 - xx) * w)
    # A wide, gentle push (not a hard cut) so the outline stays irregular near the margin.
    score -= 1.5 * np.clip(1.0 - to_edge / (0.12 * side), 0.0, 1.0) ** 2
    score[to_edge < 0.02 * side] = -np.inf
    # Threshold at the quantile giving the target coverage, keep the big pieces (drops crumbs),
    # smooth the outline a little and fill pinholes: a contiguous-ish tissue section.
    mask = score > np.quantile(score, 1.0 - coverage)
    labels, n = ndimage.label(mask)
    if n > n_pieces:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        sizes[0] = 0
        keep = np.zeros(n + 1, dtype=bool)
        keep[np.argsort(sizes)[::-1][:n_pieces]] = True
        keep |= sizes >= 0.2 * sizes.max()  # sizeable islands look natural; crumbs do not
        keep[0] = False
        mask = keep[labels]
    mask = ndimage.binary_opening(mask, iterations=2)
    return fill_small_holes(mask, max_hole_px=max(16, mask.size // 2000) + 1)  # holes of up to that many cells


def _tumor_mask(rng: np.random.Generator, tissue: np.ndarray, *, tumor_share: float) -> np.ndarray:
    """Low-res mask of 2-4 irregular blobs inside ``tissue`` covering ``tumor_share`` of it."""
    shape = tissue.shape
    if not tissue.any():
        return np.zeros(shape, dtype=bool)
    n_blobs = int(rng.integers(2, 5))
    weights = rng.dirichlet(np.full(n_blobs, 3.0))
    radii = np.sqrt(weights * tumor_share * tissue.sum() / np.pi)
    # Centres well inside the tissue, so the blobs are surrounded by normal tissue.
    depth = ndimage.distance_transform_edt(tissue)
    yy, xx = np.ogrid[0 : shape[0], 0 : shape[1]]
    score = np.full(shape, -np.inf, dtype=np.float32)
    for radius in radii:
        candidates = np.flatnonzero(depth >= min(1.3 * radius, 0.6 * depth.max()))
        cy, cx = divmod(int(rng.choice(candidates)), shape[1])
        dist = np.sqrt(((yy - cy) ** 2 + (xx - cx) ** 2).astype(np.float32)) / max(radius, 1.0)
        np.maximum(score, 1.0 - dist, out=score)
    # Irregular outline: noise on the scale of the blobs.
    score += 0.35 * _smooth_noise(rng, shape, max(float(radii.mean()) / 2, 2.0))
    # Threshold by quantile within the tissue (not at 0), so tumor_share means what it says.
    threshold = np.quantile(score[tissue], 1.0 - tumor_share)
    return tissue & (score > threshold)


# --------------------------------------------------------------------------------------------
# Nuclei
# --------------------------------------------------------------------------------------------


def _nucleus_kernels(
    rng: np.random.Generator,
    *,
    n: int,
    diameter_px: tuple[float, float],
    aspect: tuple[float, float],
    strength: tuple[float, float],
) -> list[np.ndarray]:
    """Bank of soft elliptical nucleus kernels (haematoxylin concentration), random orientation."""
    kernels = []
    for _ in range(n):
        major = rng.uniform(*diameter_px)
        minor = major * rng.uniform(*aspect)
        angle = rng.uniform(0.0, np.pi)
        half = int(np.ceil(major / 2 + 2))
        yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
        yy += rng.uniform(-0.5, 0.5)  # sub-pixel centre, so kernels are not all symmetric
        xx += rng.uniform(-0.5, 0.5)
        u = (xx * np.cos(angle) + yy * np.sin(angle)) / (major / 2)
        v = (-xx * np.sin(angle) + yy * np.cos(angle)) / (minor / 2)
        r = np.sqrt(u * u + v * v)
        # Soft edge about 1.5 px wide (smoothstep), chromatin texture and a slightly darker rim
        # (nuclear membrane).
        edge = np.clip((1.0 - r) * (minor / 2) / 1.5 + 0.5, 0.0, 1.0)
        edge = edge * edge * (3.0 - 2.0 * edge)
        chromatin = ndimage.gaussian_filter(rng.standard_normal(r.shape), 0.8)
        chromatin /= chromatin.std() + 1e-8
        body = 0.82 + 0.1 * chromatin + 0.15 * np.clip(r, 0.0, 1.0) ** 4
        kernels.append((edge * body * rng.uniform(*strength)).astype(np.float32))
    return kernels


def _stamp(canvas: np.ndarray, kernels: list[np.ndarray], ys: np.ndarray, xs: np.ndarray, which: np.ndarray) -> None:
    """Max-composite ``kernels[which[i]]`` centred at (ys[i], xs[i]) into ``canvas`` in place.

    Max (not sum) so overlapping nuclei merge instead of turning black.
    """
    h, w = canvas.shape
    for y, x, k in zip(ys.tolist(), xs.tolist(), which.tolist(), strict=True):
        kernel = kernels[k]
        half = kernel.shape[0] // 2
        y0, x0 = y - half, x - half
        y1, x1 = y0 + kernel.shape[0], x0 + kernel.shape[1]
        # Clip at the slide border.
        ky0, kx0 = max(0, -y0), max(0, -x0)
        ky1, kx1 = kernel.shape[0] - max(0, y1 - h), kernel.shape[1] - max(0, x1 - w)
        if ky1 <= ky0 or kx1 <= kx0:
            continue
        view = canvas[max(y0, 0) : min(y1, h), max(x0, 0) : min(x1, w)]
        np.maximum(view, kernel[ky0:ky1, kx0:kx1], out=view)


def _sample_in_grid(
    rng: np.random.Generator, weight: np.ndarray, *, n: int, factor: int, shape_px: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` level-0 points drawn with density proportional to the low-res ``weight`` grid."""
    flat = weight.ravel().astype(np.float64)
    total = flat.sum()
    if n <= 0 or total <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    cells = rng.choice(flat.size, size=n, p=flat / total)
    cy, cx = np.divmod(cells, weight.shape[1])
    ys = cy * factor + rng.integers(0, factor, size=n)
    xs = cx * factor + rng.integers(0, factor, size=n)
    keep = (ys < shape_px[0]) & (xs < shape_px[1])
    return ys[keep], xs[keep]


# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------


def _upsample_chunk(padded: np.ndarray, row0: int, n_rows: int, width_px: int, factor: int) -> np.ndarray:
    """Bilinear upsampling (pixel-centre aligned) of level-0 rows ``row0:row0+n_rows``.

    ``padded`` is the low-res field with one edge-replicated cell on each side; ``row0`` must be a
    multiple of ``factor``. Works phase by phase with plain slices (no gathers), which is several
    times faster than ``ndimage.zoom`` at this size.
    """
    w_low = padded.shape[1] - 2
    m = -(-n_rows // factor)
    j0 = row0 // factor
    rows = np.empty((m * factor, w_low + 2), dtype=np.float32)
    out = np.empty((m * factor, w_low * factor), dtype=np.float32)
    for p in range(factor):
        # Offset of output phase p from its cell centre, in cells: in (-0.5, 0.5).
        d = (p + 0.5) / factor - 0.5
        lo, wt = (0, -d) if d < 0 else (1, 1.0 - d)  # first neighbour (in padded index) and weight
        a = padded[j0 + lo : j0 + lo + m]
        b = padded[j0 + lo + 1 : j0 + lo + 1 + m]
        rows[p::factor] = a * np.float32(wt) + b * np.float32(1.0 - wt)
    for p in range(factor):
        d = (p + 0.5) / factor - 0.5
        lo, wt = (0, -d) if d < 0 else (1, 1.0 - d)
        out[:, p::factor] = rows[:, lo : lo + w_low] * np.float32(wt) + rows[:, lo + 1 : lo + 1 + w_low] * np.float32(
            1.0 - wt
        )
    return out[:n_rows, :width_px]


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


def write_pyramidal_tiff(
    path: Path,
    image: np.ndarray,
    *,
    mpp: float,
    downsamples: Sequence[int] = (1, 4, 16),
    tile_px: int = 256,
    jpeg_quality: int = 90,
) -> None:
    """Write ``image`` as a tiled, JPEG-compressed pyramidal TIFF that OpenSlide reads.

    One page per level (OpenSlide's generic-tiff reader ignores SubIFDs): level 0 with
    ``subfiletype=0``, reduced levels with ``subfiletype=1``. Resolution tags are in pixels per
    centimetre (``1e4 / (mpp * downsample)``); OpenSlide derives ``openslide.mpp-x``/``-y`` from
    XResolution/YResolution when ResolutionUnit is centimetre. Written atomically.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    downsamples = [int(d) for d in downsamples]
    increasing = all(b > a for a, b in itertools.pairwise(downsamples))
    if not downsamples or downsamples[0] != 1 or not increasing:
        raise ValueError(f"downsamples must start at 1 and increase strictly, got {downsamples}")
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    if tile_px % 16:
        raise ValueError(f"tile_px must be a multiple of 16 (TIFF tiles), got {tile_px}")

    def write(fh: BinaryIO) -> None:
        # bigtiff only when needed: plain TIFF is the most widely readable.
        bigtiff = image.nbytes > 2**31
        with tifffile.TiffWriter(fh, bigtiff=bigtiff) as tif:
            level, previous = image, 1
            for i, downsample in enumerate(downsamples):
                # Each level from the previous one when the ratio is integral (cheaper).
                if downsample % previous == 0:
                    level = _downsample(level, downsample // previous)
                else:
                    level = _downsample(image, downsample)
                previous = downsample
                px_per_cm = 1e4 / (mpp * downsample)
                tif.write(
                    level,
                    photometric="rgb",
                    tile=(tile_px, tile_px),
                    compression="jpeg",
                    compressionargs={"level": jpeg_quality},
                    subfiletype=0 if i == 0 else 1,
                    resolution=(px_per_cm, px_per_cm),
                    resolutionunit="CENTIMETER",
                    metadata=None,  # no JSON ImageDescription
                    datetime=None,  # no DateTime tag: byte-identical reruns
                )

    with atomic_file(path) as tmp, open(tmp, "xb") as fh:
        write(fh)


def _balanced_labels(n_slides: int, seed: int) -> np.ndarray:
    """0/1 per slide: floor(n/2) negatives, ceil(n/2) positives, in a seeded random order."""
    base = np.array([0] * (n_slides // 2) + [1] * (n_slides - n_slides // 2))
    return np.random.default_rng((seed, _LABEL_STREAM)).permutation(base)


def write_demo_cohort(
    *,
    slides_dir: Path,
    samples_csv: Path,
    n_slides: int,
    seed: int,
    classes: Sequence[str],
    mpp: float = 0.5,
    width_px: int = 5600,
    height_px: int = 4480,
    tumor_share: float = 0.08,
    min_tumor_share: float | None = None,
    masks_dir: Path | None = None,
    workers: int = 1,
) -> pd.DataFrame:
    """Write ``n_slides`` synthetic slides ``demo_{i:03d}.tiff`` and their sample sheet.

    Labels are ``classes[0]`` (no tumour) or ``classes[1]`` (tumour regions), balanced and in a
    seeded order. A positive slide's tumour covers a share of its tissue drawn log-uniformly from
    [``min_tumor_share``, ``tumor_share``] (default: exactly ``tumor_share``), so that some carry
    only small foci. Slide ``i`` is rendered from ``default_rng((seed, 1, i))``, so each file
    depends only on (seed, i, size, mpp, the tumour shares, its label). With ``masks_dir``, each
    slide's tumour mask is written there too (``{slide_id}.npz``: ``tumor`` bool at
    ``downsample`` 4, the generator's own ground truth). Returns the sample sheet (columns
    ``slide_id, path, label``; ``path`` relative to the directory of ``samples_csv``), which is
    also written atomically to ``samples_csv``.
    """
    classes = list(classes)
    if len(classes) != 2:
        raise ConfigError(f"the demo cohort has exactly 2 classes (negative, positive), got {len(classes)}: {classes}")
    if classes[0] == classes[1]:
        raise ConfigError(f"the two classes must differ, got {classes}")
    if n_slides < 2:
        raise ConfigError(f"n_slides must be at least 2 (one per class), got {n_slides}")
    if seed < 0:
        raise ConfigError(f"seed must be non-negative, got {seed}")
    min_tumor_share = tumor_share if min_tumor_share is None else min_tumor_share
    if not 0.0 < min_tumor_share <= tumor_share:
        raise ConfigError(f"need 0 < min_tumor_share <= tumor_share, got {min_tumor_share} and {tumor_share}")
    slides_dir, samples_csv = Path(slides_dir), Path(samples_csv)
    slides_dir.mkdir(parents=True, exist_ok=True)
    if masks_dir is not None:
        Path(masks_dir).mkdir(parents=True, exist_ok=True)

    labels = _balanced_labels(n_slides, seed)

    def write_slide(i: int) -> dict[str, str]:
        slide_id, positive = f"demo_{i:03d}", int(labels[i])
        path = slides_dir / f"{slide_id}.tiff"
        rng = np.random.default_rng((seed, _SLIDE_STREAM, i))
        # Its own stream, drawn only when the share varies: the slide's other draws never move.
        share = tumor_share
        if min_tumor_share < tumor_share:
            share_rng = np.random.default_rng((seed, _SHARE_STREAM, i))
            share = float(np.exp(share_rng.uniform(np.log(min_tumor_share), np.log(tumor_share))))
        rendered = render_slide_with_masks(
            rng=rng, width_px=width_px, height_px=height_px, tumor=bool(positive), tumor_share=share
        )
        write_pyramidal_tiff(path, rendered.image, mpp=mpp)
        if masks_dir is not None:
            f = _LOWRES_FACTOR
            with atomic_file(Path(masks_dir) / f"{slide_id}.npz") as tmp, open(tmp, "xb") as fh:
                np.savez_compressed(fh, tumor=rendered.tumor[::f, ::f], downsample=np.int64(f))
        logger.info(
            "wrote %s (%s, tumour share %.4f, %dx%d px, %.3f mpp)",
            path,
            classes[positive],
            share if positive else 0.0,
            width_px,
            height_px,
            mpp,
        )
        # Relative to the sheet, as the workflow resolves it: the cohort can be moved as a whole.
        return {"slide_id": slide_id, "path": os.path.relpath(path, samples_csv.parent), "label": classes[positive]}

    # Each slide has its own generator, so threads (numpy and the JPEG codec release the GIL)
    # change nothing in the output.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        rows = list(pool.map(write_slide, range(n_slides)))

    sheet = pd.DataFrame(rows, columns=list(SAMPLE_COLUMNS))

    with atomic_file(samples_csv) as tmp, open(tmp, "xb") as fh:
        fh.write(sheet.to_csv(index=False, lineterminator="\n").encode("utf-8"))
    return sheet
