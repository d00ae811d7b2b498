"""Perturb one slide: choose the tiles, attack them, store the uint8 adversarial tiles."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsiattack import stores
from wsiattack.attacks.budget import select_tiles, slide_rng, tiles_to_attack
from wsiattack.attacks.methods import build_method, quantize
from wsiattack.encoders.model import TileEncoder, channels_first, to_unit_pixels

log = logging.getLogger(__name__)

ATTACK_BATCH = 16  # tiles attacked together; k is small, so this bounds memory, not speed


def perturb_slide(*, slide_id: str, tiles_store: str | Path, encoder: TileEncoder, spec: Mapping[str, Any], out_store: str | Path, device: torch.device) -> int:
    """Attack ``k`` tiles of one slide with ``spec`` (a normalised attack entry); return k."""
    tiles = stores.open_store(tiles_store, kind=stores.TILES)["tiles"]
    n_tiles = tiles.shape[0]
    rng = slide_rng(spec["seed"], slide_id)
    k = tiles_to_attack(n_tiles, **spec["budget"])
    index = select_tiles(n_tiles, k, strategy=spec["selection"], rng=rng)
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    method, objective = build_method(dict(spec))
    encoder = encoder.to(device).eval()

    started = time.perf_counter()
    clean_uint8 = np.asarray(tiles.get_orthogonal_selection((index,)))  # one read of k tiles
    results = [_attack_batch(encoder, clean_uint8[s : s + ATTACK_BATCH], method, objective, generator, spec["eps"], device) for s in range(0, k, ATTACK_BATCH)]
    merged = {key: np.concatenate([r[key] for r in results]) for key in results[0]}
    log.info("%s: attacked %d/%d tiles with %s in %.1f s; mean objective %.4f (after rounding)", slide_id, k, n_tiles, spec["name"], time.perf_counter() - started, merged["objective"].mean())

    attrs = {"slide_id": slide_id, "attack": dict(spec), "encoder": encoder.describe(), "n_tiles": n_tiles, "k": k, "label_free": True, "threat_model": "white-box"}
    with stores.atomic_store(out_store, kind=stores.ATTACK, attrs=attrs) as group:
        stores.write_array(group, "index", index)
        stores.write_tile_batch(group, "adv_tiles", merged.pop("adv_tiles"))
        for name, values in merged.items():
            stores.write_array(group, name, values)
    return k


def _attack_batch(encoder, clean_uint8: np.ndarray, method, objective, generator, eps: float, device) -> dict[str, np.ndarray]:
    clean = to_unit_pixels(clean_uint8).to(device)
    with torch.no_grad():
        clean_embedding = encoder(clean)
    outcome = method(encoder, clean, clean_embedding, generator, objective)
    clean_levels = channels_first(clean_uint8).to(device)
    adv_uint8 = quantize(outcome.adversarial, clean_levels, eps)
    with torch.no_grad():
        after_rounding = objective(encoder(adv_uint8.float() / 255), clean_embedding)
    delta = (adv_uint8.float() - clean_levels.float()).flatten(1) / 255  # exact grey-level steps
    return {
        "adv_tiles": adv_uint8.permute(0, 2, 3, 1).cpu().numpy(),
        "linf": delta.abs().amax(dim=1).cpu().numpy().astype(np.float32),
        "l2": delta.norm(dim=1).cpu().numpy().astype(np.float32),
        "objective_before_rounding": outcome.objective.cpu().numpy().astype(np.float32),
        "objective": after_rounding.cpu().numpy().astype(np.float32),
    }
