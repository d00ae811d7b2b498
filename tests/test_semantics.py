"""Tile content statistics, demo tumour fractions and the vulnerability correlations."""

import numpy as np
import pandas as pd
import pytest
from wsiattack import semantics


def _flat(rgb, n=1, px=8):
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (n, px, px, 3)).copy()


def test_content_of_glass_stroma_and_nuclei():
    glass, stroma, nucleus = (
        semantics.tile_content(_flat(c)).iloc[0] for c in ((242, 241, 243), (230, 160, 190), (90, 60, 140))
    )
    assert glass["tissue_fraction"] == 0 and stroma["tissue_fraction"] == nucleus["tissue_fraction"] == 1
    assert nucleus["haematoxylin_od"] > 0.5 > 0.1 > max(glass["haematoxylin_od"], stroma["haematoxylin_od"])
    assert nucleus["nuclear_fraction"] == 1 and stroma["nuclear_fraction"] == 0
    assert glass["saturation"] < 0.02 < stroma["saturation"]
    assert stroma["mean_r"] == pytest.approx(230)
    half = _flat((230, 160, 190), px=8)
    half[0, :4] = (90, 60, 140)
    assert semantics.tile_content(half).iloc[0]["nuclear_fraction"] == pytest.approx(0.5)


def test_demo_tumor_fraction_counts_mask_cells_under_each_tile(tmp_path):
    mask = np.zeros((20, 20), dtype=bool)
    mask[:5, :10] = True  # level-0 rows 0..19, columns 0..39 at downsample 4
    np.savez(tmp_path / "m.npz", tumor=mask, downsample=4)
    coords = np.array([[0, 0], [20, 0], [40, 0], [0, 40]])  # tiles of 20 level-0 px
    fractions = semantics.demo_tumor_fraction(mask_path=tmp_path / "m.npz", coords=coords, side0_px=20)
    np.testing.assert_allclose(fractions, [1.0, 1.0, 0.0, 0.0])
    corner = semantics.demo_tumor_fraction(mask_path=tmp_path / "m.npz", coords=np.array([[32, 12]]), side0_px=20)
    np.testing.assert_allclose(corner, [0.16])  # columns 32..51 x rows 12..31: 8/20 x 8/20 inside


def test_correlations_find_a_monotone_link_and_refuse_constants():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=200)
    table = pd.DataFrame(
        {
            "slide_id": "s",
            "tile": range(200),
            "cosine_distance": x**3,
            "linked": x,
            "noise": rng.uniform(size=200),
            "flat": 1.0,
        }
    )
    result = semantics.correlations(table).set_index("content")
    assert result.loc["linked", "spearman_rho"] == pytest.approx(1.0)
    assert abs(result.loc["noise", "spearman_rho"]) < 0.2 and result.loc["noise", "p_value"] > 0.01
    assert np.isnan(result.loc["flat", "spearman_rho"]) and result.loc["flat", "n_tiles"] == 200
