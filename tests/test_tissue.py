"""Tissue detection on thumbnails and the per-tile tissue fraction."""

import numpy as np
from wsiattack import tissue


def test_otsu_splits_a_bimodal_histogram():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.02, 5000), rng.normal(0.6, 0.05, 5000)]).clip(0, 1)
    threshold = tissue.otsu_threshold(values)
    assert (values[:5000] < threshold).mean() > 0.99 and (values[5000:] > threshold).mean() > 0.99


def test_detects_pink_blob_fills_small_holes_keeps_large_ones_and_drops_specks():
    thumb = np.full((100, 120, 3), 240, dtype=np.uint8)
    yy, xx = np.mgrid[:100, :120]
    blob = (yy - 50) ** 2 + (xx - 60) ** 2 < 30**2
    thumb[blob] = (220, 140, 180)
    thumb[30:36, 58:64] = 240  # a small hole (36 px): a vessel, part of the tissue
    thumb[50:62, 50:62] = 240  # a large hole (144 px): a lumen, background
    thumb[5:7, 5:7] = (200, 100, 150)  # a speck of debris
    mask = tissue.detect_tissue(thumb, min_object_px=50, max_hole_px=100)
    assert mask[33, 60]  # small hole filled
    assert not mask[52:60, 52:60].any()  # large hole kept (closing only rounds its corners)
    assert not mask[6, 6]  # speck removed
    expected = blob.sum() - 144
    assert abs(int(mask.sum()) - int(expected)) < 0.05 * expected


def test_fill_small_holes_and_remove_small_objects_use_their_size_limits():
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:18, 2:18] = True
    mask[4:6, 4:6] = False  # 4 px hole
    mask[10:14, 10:14] = False  # 16 px hole
    filled = tissue.fill_small_holes(mask, max_hole_px=5)
    assert filled[4:6, 4:6].all() and not filled[10:14, 10:14].any()
    assert tissue.fill_small_holes(mask, max_hole_px=17)[10:14, 10:14].all()
    assert tissue.fill_small_holes(mask, max_hole_px=4)[4:6, 4:6].sum() == 0  # "smaller than": 4 is kept
    objects = np.zeros((10, 10), dtype=bool)
    objects[0:2, 0:2] = objects[5:9, 5:9] = True  # 4 px and 16 px
    kept = tissue.remove_small_objects(objects, min_object_px=5)
    assert not kept[0:2, 0:2].any() and kept[5:9, 5:9].all()


def test_saturation_of_grey_white_black_and_pink():
    rgb = np.array([[[128, 128, 128], [255, 255, 255], [0, 0, 0], [220, 140, 180]]], dtype=np.uint8)
    np.testing.assert_allclose(tissue.saturation(rgb), [[0.0, 0.0, 0.0, 80 / 220]], rtol=1e-6)


def test_blank_slide_has_no_tissue():
    rng = np.random.default_rng(0)
    thumb = (240 + rng.integers(-4, 5, size=(80, 80, 3))).astype(np.uint8)
    assert not tissue.detect_tissue(thumb, min_object_px=10, max_hole_px=10).any()


def test_tissue_fraction_per_box_is_exact_and_counts_off_slide_as_background():
    mask = np.zeros((10, 10), dtype=bool)
    mask[:5, :] = True
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [0, 5, 10, 10], [5, 0, 15, 5]])
    np.testing.assert_allclose(tissue.tissue_fraction_per_box(mask, boxes), [0.5, 1.0, 0.0, 0.5])
