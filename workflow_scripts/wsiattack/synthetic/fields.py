"""Random fields, tissue and tumour geometry, and nuclei of the synthetic slides (see the package docstring)."""

from __future__ import annotations

import numpy as np
import scipy.fft
from scipy import ndimage

from wsiattack.tissue import fill_small_holes

# Smooth fields (tissue mask, stain, tumour regions) live on a grid this many times coarser than
# level 0 and are bilinearly upsampled while composing.
_LOWRES_FACTOR = 4
# Level-0 rows composed at a time: keeps the float32 temporaries in cache. Must be a multiple of
# _LOWRES_FACTOR and divide _TEXTURE_PX (so a chunk never wraps around the texture patch).
_CHUNK_ROWS = 256
# Side of the periodic fibre/grain texture patches tiled over the slide.
_TEXTURE_PX = 1024


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
