"""Vulnerability against semantic content: how far each attacked tile's features moved, next to
what the tile shows.

For every cohort the content is measured from the clean pixels: mean RGB, saturation, tissue
(non-glass) fraction, and haematoxylin optical density by colour deconvolution (Ruifrok &
Johnston's H&E stain vectors), whose high-density share stands in for nuclei density. For the
demo cohort the generator's own tumour mask adds the tile's tumour fraction (``demo_masks``).
The association is reported as Spearman rank correlations, which assume no linearity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from wsiattack import stores
from wsiattack.tilereader import TileReader

# Ruifrok & Johnston (2001) unit optical-density vectors (rows: haematoxylin, eosin, residual).
_STAIN_OD = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]])
_STAIN_OD = _STAIN_OD / np.linalg.norm(_STAIN_OD, axis=1, keepdims=True)
_OD_TO_STAINS = np.linalg.inv(_STAIN_OD)
NUCLEAR_H_OD = 0.4  # haematoxylin OD above which a pixel counts as nuclear (chromatin-dense)
GLASS_LEVEL = 215  # mean RGB above which a pixel is glass, not tissue

CONTENT_COLUMNS = ("mean_r", "mean_g", "mean_b", "saturation", "tissue_fraction", "haematoxylin_od", "nuclear_fraction")


def tile_content(tiles: np.ndarray) -> pd.DataFrame:
    """Content statistics of uint8 RGB tiles (k, T, T, 3), one row per tile."""
    pixels = tiles.reshape(len(tiles), -1, 3).astype(np.float64)
    od = -np.log(np.maximum(pixels, 1.0) / 255.0)
    haematoxylin = (od @ _OD_TO_STAINS)[..., 0]
    high, low = pixels.max(axis=2), pixels.min(axis=2)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1.0), 0.0)
    means = pixels.mean(axis=1)
    return pd.DataFrame(
        {
            "mean_r": means[:, 0],
            "mean_g": means[:, 1],
            "mean_b": means[:, 2],
            "saturation": saturation.mean(axis=1),
            "tissue_fraction": (pixels.mean(axis=2) < GLASS_LEVEL).mean(axis=1),
            "haematoxylin_od": haematoxylin.mean(axis=1),
            "nuclear_fraction": (haematoxylin > NUCLEAR_H_OD).mean(axis=1),
        }
    )


def _cosine_distance_rows(clean: np.ndarray, attacked: np.ndarray) -> np.ndarray:
    dot = (clean * attacked).sum(axis=1)
    return 1.0 - dot / np.maximum(np.linalg.norm(clean, axis=1) * np.linalg.norm(attacked, axis=1), 1e-12)


def vulnerability_table(
    *,
    slide_ids: Sequence[str],
    tile_dirs: Sequence[str | Path],
    feature_dirs: Sequence[str | Path],
    reembedded_dirs: Sequence[str | Path],
    tumor_fraction: Mapping[str, np.ndarray] | None = None,
) -> pd.DataFrame:
    """One row per attacked tile: slide, tile index, 1 − cos(clean, attacked features), content.

    ``tumor_fraction`` (slide id -> per-tile tumour fraction over all the slide's tiles), when
    known, adds that column."""
    rows = []
    for slide_id in slide_ids:
        replaced = stores.open_store(stores.find_slide_store(reembedded_dirs, slide_id), kind=stores.REEMBEDDED)
        index = np.asarray(replaced["index"][...])
        if len(index) == 0:
            continue
        clean = np.asarray(
            stores.open_store(stores.find_slide_store(feature_dirs, slide_id), kind=stores.FEATURES)["features"][...]
        )
        with TileReader(stores.find_slide_store(tile_dirs, slide_id)) as reader:
            content = tile_content(reader.read(index))
        table = content.assign(
            slide_id=slide_id,
            tile=index,
            cosine_distance=_cosine_distance_rows(clean[index], np.asarray(replaced["features"][...])),
        )
        if tumor_fraction is not None:
            table["tumor_fraction"] = tumor_fraction[slide_id][index]
        rows.append(table)
    columns = [
        "slide_id",
        "tile",
        "cosine_distance",
        *CONTENT_COLUMNS,
        *(["tumor_fraction"] if tumor_fraction is not None else []),
    ]
    return pd.concat(rows, ignore_index=True)[columns] if rows else pd.DataFrame(columns=columns)


def correlations(table: pd.DataFrame) -> pd.DataFrame:
    """Spearman rho (and two-sided p) of the feature shift against each content column."""
    out = []
    for column in [c for c in table.columns if c not in ("slide_id", "tile", "cosine_distance")]:
        valid = table[["cosine_distance", column]].dropna()
        constant = len(valid) < 3 or valid[column].nunique() < 2 or valid["cosine_distance"].nunique() < 2
        rho, p = (np.nan, np.nan) if constant else stats.spearmanr(valid["cosine_distance"], valid[column])
        out.append({"content": column, "spearman_rho": float(rho), "p_value": float(p), "n_tiles": len(valid)})
    return pd.DataFrame(out)


def demo_tumor_fraction(*, mask_path: str | Path, coords: np.ndarray, side0_px: float) -> np.ndarray:
    """Per tile, the share of its level-0 square inside the generator's tumour mask (.npz with
    ``tumor`` bool (h, w) and ``downsample``, written with each demo slide)."""
    with np.load(mask_path) as saved:
        mask, downsample = saved["tumor"], float(saved["downsample"])
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    x0, y0 = np.floor(coords / downsample).astype(int).T
    side = max(1, int(round(side0_px / downsample)))
    x1, y1 = np.minimum(x0 + side, mask.shape[1]), np.minimum(y0 + side, mask.shape[0])
    x0, y0 = np.minimum(x0, x1), np.minimum(y0, y1)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / np.maximum((x1 - x0) * (y1 - y0), 1)


def demo_tumor_fractions(
    *, masks_dir: str | Path, tile_dirs: Sequence[str | Path], slide_ids: Sequence[str]
) -> dict[str, np.ndarray]:
    """Slide id -> per-tile tumour fraction of every tile, from the demo cohort's masks."""
    fractions = {}
    for slide_id in slide_ids:
        tiles = stores.open_store(stores.find_slide_store(tile_dirs, slide_id), kind=stores.TILES)
        fractions[slide_id] = demo_tumor_fraction(
            mask_path=Path(masks_dir) / f"{slide_id}.npz",
            coords=np.asarray(tiles["coords"][...]),
            side0_px=float(tiles.attrs["geometry"]["side0_px"]),
        )
    return fractions
