"""Tissue detection on a low-resolution thumbnail: saturation, Otsu, morphological clean-up."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Glass and white background have almost no saturation; a floor under Otsu's threshold keeps a
# blank slide (where Otsu would split sensor noise in two) from being called tissue.
MIN_SATURATION = 0.08


def otsu_threshold(
    values: np.ndarray, *, bins: int = 256, value_range: tuple[float, float] | None = (0.0, 1.0)
) -> float:
    """Otsu's threshold (maximises the between-class variance) of values in ``value_range``
    (None: the values' own range, as for stain concentrations)."""
    hist, edges = np.histogram(values, bins=bins, range=value_range)
    centers = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(hist * centers)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centers[int(np.argmax(between))])


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (max - min) / max of a uint8 RGB image, as float32 in [0, 1]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # channel-wise maximum/minimum: numpy's reductions over a last axis of 3 are ~10x slower
    high = np.maximum(np.maximum(r, g), b)
    sat = (high - np.minimum(np.minimum(r, g), b)).astype(np.float32)  # uint8 first: no float copy of the image
    sat /= np.maximum(high, 1)
    return sat


def detect_tissue(rgb: np.ndarray, *, min_object_px: int, max_hole_px: int) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail.

    Otsu on saturation, then closing (joins stroma fibres), opening (drops isolated pixels),
    filling of holes smaller than ``max_hole_px`` and removal of objects smaller than
    ``min_object_px`` (dust, debris).

    Hole policy: a small hole (a capillary, a few fat cells, a crack) is part of the tissue
    texture, so the tiles straddling it keep their true tissue fraction; a large hole (a lumen,
    a fat lobule, a tear) shows glass, and a tile lying in it carries no tissue information, so it
    stays background and its tiles fail ``min_fraction``.
    """
    sat = saturation(rgb)
    threshold = max(otsu_threshold(sat), MIN_SATURATION)
    mask = sat > threshold
    structure = ndimage.generate_binary_structure(2, 1)
    mask = ndimage.binary_closing(mask, structure=structure, iterations=2, border_value=0)
    mask = ndimage.binary_opening(mask, structure=structure, iterations=1)
    mask = fill_small_holes(mask, max_hole_px=max_hole_px)
    return remove_small_objects(mask, min_object_px=min_object_px)


def fill_small_holes(mask: np.ndarray, *, max_hole_px: int) -> np.ndarray:
    """Fill the background regions enclosed by ``mask`` that have fewer than ``max_hole_px`` pixels."""
    holes, n_holes = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
    if not n_holes:
        return mask
    small = np.bincount(holes.ravel()) < max_hole_px
    small[0] = False
    return mask | small[holes]


def remove_small_objects(mask: np.ndarray, *, min_object_px: int) -> np.ndarray:
    """Drop the connected components of ``mask`` that have fewer than ``min_object_px`` pixels."""
    labels, n_objects = ndimage.label(mask)
    if not n_objects:
        return mask
    keep = np.bincount(labels.ravel()) >= max(1, min_object_px)
    keep[0] = False
    return keep[labels]


def tissue_fraction_per_box(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Mean of ``mask`` over each (x0, y0, x1, y1) box in mask pixels, via an integral image."""
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0), axis=1)
    height, width = mask.shape
    x0, x1 = np.clip(boxes[:, 0], 0, width), np.clip(boxes[:, 2], 0, width)
    y0, y1 = np.clip(boxes[:, 1], 0, height), np.clip(boxes[:, 3], 0, height)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    # Nominal area: the part of a box beyond the slide's edge counts as background.
    area = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1)
    return inside / area
