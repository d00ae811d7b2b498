"""Tissue detection on thumbnails and the per-tile tissue fraction."""

import numpy as np

from wsiattack import tissue


def test_otsu_splits_a_bimodal_histogram():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.02, 5000), rng.normal(0.6, 0.05, 5000)]).clip(0, 1)
    threshold = tissue.otsu_threshold(values)
    assert (values[:5000] < threshold).mean() > 0.99 and (values[5000:] > threshold).mean() > 0.99


def test_detects_pink_blob_fills_holes_and_drops_specks():
    thumb = np.full((100, 120, 3), 240, dtype=np.uint8)
    yy, xx = np.mgrid[:100, :120]
    blob = (yy - 50) ** 2 + (xx - 60) ** 2 < 30**2
    thumb[blob] = (220, 140, 180)
    thumb[48:52, 58:62] = 240  # a small hole (a lumen) inside the tissue
    thumb[5:7, 5:7] = (200, 100, 150)  # a speck of debris
    mask = tissue.detect_tissue(thumb, min_object_px=50)
    assert mask[50, 60]  # hole filled
    assert not mask[6, 6]  # speck removed
    assert abs(int(mask.sum()) - int(blob.sum())) < 0.05 * blob.sum()


def test_blank_slide_has_no_tissue():
    rng = np.random.default_rng(0)
    thumb = (240 + rng.integers(-4, 5, size=(80, 80, 3))).astype(np.uint8)
    assert not tissue.detect_tissue(thumb, min_object_px=10).any()


def test_tissue_fraction_per_box_is_exact_and_counts_off_slide_as_background():
    mask = np.zeros((10, 10), dtype=bool)
    mask[:5, :] = True
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [0, 5, 10, 10], [5, 0, 15, 5]])
    np.testing.assert_allclose(tissue.tissue_fraction_per_box(mask, boxes), [0.5, 1.0, 0.0, 0.5])
