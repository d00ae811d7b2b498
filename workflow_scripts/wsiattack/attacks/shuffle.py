"""The shuffled-perturbation control (Bortsova et al. 2021): another attack's stored perturbation
with its pixels' positions permuted per tile, so that it has the same values (the same energy and
histogram, jointly over RGB) but no spatial structure.

Each perturbed tile's offsets ``adv − clean`` (grey levels) are permuted over the tile's pixels
(the RGB triple of a pixel moves together) and added to the same clean tile; values pushed out of
[0, 255] are clipped, and the share of clipped values is stored per tile (``clipped``), so the
exactness of the control is visible: on values that are not clipped, the stored offsets are the
source's, permuted. The store is an attack store (``stores``) with the source's ``index`` and
``selection_score``; no encoder runs, so there are no objective or iteration arrays.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wsiattack import stores
from wsiattack.attacks.budget import slide_rng
from wsiattack.attacks.params import threat_marking
from wsiattack.tilereader import TileReader

log = logging.getLogger(__name__)

SHUFFLE_STREAM = 2  # random stream of the permutations (0 picks tiles, 1 the vulnerability probe)


def shuffle_perturbation(
    clean_uint8: np.ndarray, adv_uint8: np.ndarray, *, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(k, T, T, 3) uint8 tiles -> (shuffled uint8 tiles, their permuted offsets before clipping
    (int16), the share of clipped values per tile)."""
    offsets = adv_uint8.astype(np.int16) - clean_uint8.astype(np.int16)
    k, height, width, channels = offsets.shape
    permuted = np.empty_like(offsets)
    for i in range(k):
        order = rng.permutation(height * width)
        permuted[i] = offsets[i].reshape(-1, channels)[order].reshape(height, width, channels)
    unclipped = clean_uint8.astype(np.int16) + permuted
    shuffled = np.clip(unclipped, 0, 255).astype(np.uint8)
    clipped = (shuffled != unclipped).reshape(k, -1).mean(axis=1).astype(np.float32)
    return shuffled, permuted, clipped


def shuffle_slide(
    *,
    slide_id: str,
    source_store: str | Path,
    tiles_store: str | Path,
    spec: Mapping[str, Any],
    out_store: str | Path,
    slide_path: str | Path | None = None,
) -> int:
    """Write the shuffled control of the source attack store of one slide; return k."""
    source = stores.open_store(source_store, kind=stores.ATTACK)
    index = np.asarray(source["index"][...])
    adversarial = np.asarray(source["adv_tiles"][...])
    with TileReader(tiles_store, slide_path=slide_path) as tiles:
        clean = np.asarray(tiles.get_orthogonal_selection((index,))) if len(index) else adversarial.copy()
    rng = slide_rng(spec["seed"], slide_id, stream=SHUFFLE_STREAM)
    shuffled, _, clipped = shuffle_perturbation(clean, adversarial, rng=rng)
    attrs = {
        "slide_id": slide_id,
        "attack": dict(spec),
        "encoder": source.attrs.get("encoder", {}),
        "n_tiles": source.attrs["n_tiles"],
        "k": len(index),
        "source": {"attack": source.attrs["attack"].get("name"), "bound": source.attrs.get("bound")},
        **threat_marking(spec),
    }
    stores.write_encoder_free_attack(
        out_store,
        attrs=attrs,
        index=index,
        clean=clean,
        adversarial=shuffled,
        clipped=clipped,
        selection_score=np.asarray(source["selection_score"][...]) if "selection_score" in source else None,
    )
    if len(index):
        log.info(
            "%s: shuffled %d tiles of %s (%.4f of values clipped)", slide_id, len(index), spec["source"], clipped.mean()
        )
    return len(index)
