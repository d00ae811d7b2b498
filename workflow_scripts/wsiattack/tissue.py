"""Tissue detection on a low-resolution thumbnail: saturation, Otsu, morphological clean-up."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Glass and white background have almost no saturation; a floor under Otsu's threshold keeps a
# blank slide (where Otsu would split sensor noise in two) from being called tissue.
MIN_SATURATION = 0.08


def otsu_threshold(values: np.ndarray, *, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (maximises the between-class variance)."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centers = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(hist * centers)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centers[int(np.argmax(between))])


def saturation(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32)
    high = rgb.max(axis=-1)
    low = rgb.min(axis=-1)
    return np.where(high > 0, (high - low) / np.maximum(high, 1), 0.0)


def detect_tissue(rgb: np.ndarray, *, min_object_px: int) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail.

    Otsu on saturation, then closing (joins stroma fibres), hole filling (lumina and fat inside
    tissue count as tissue) and removal of objects smaller than ``min_object_px`` (dust, debris).
    """
    sat = saturation(rgb)
    threshold = max(otsu_threshold(sat), MIN_SATURATION)
    mask = sat > threshold
    structure = ndimage.generate_binary_structure(2, 1)
    mask = ndimage.binary_closing(mask, structure=structure, iterations=2, border_value=0)
    mask = ndimage.binary_opening(mask, structure=structure, iterations=1)
    mask = ndimage.binary_fill_holes(mask)
    labels, n_objects = ndimage.label(mask)
    if n_objects:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= max(1, min_object_px)
        keep[0] = False
        mask = keep[labels]
    return mask


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
