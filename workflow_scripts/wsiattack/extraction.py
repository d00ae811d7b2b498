"""Clean feature extraction per slide, and re-embedding of just the k adversarial tiles.

The GPU rules call these once per slide of their shard, with one encoder built per job
(``shardjobs``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from wsiattack import stores
from wsiattack.attacks.params import threat_marking
from wsiattack.encoders.embedding import embed_tiles
from wsiattack.encoders.model import TileEncoder
from wsiattack.tilereader import TileReader

log = logging.getLogger(__name__)


def extract_slide(
    *,
    slide_id: str,
    tiles_store: str | Path,
    encoder: TileEncoder,
    batch_size: int,
    device: torch.device,
    out_store: str | Path,
    slide_path: str | Path | None = None,
    reader_threads: int = 1,
) -> int:
    """Embed every tile of a tiles store into a features store; return N.

    Pixels come from ``TileReader``: decoded from the slide (``slide_path``, default the path
    recorded at tiling) on ``reader_threads`` background threads while the model runs.
    """
    started = time.perf_counter()
    with TileReader(tiles_store, slide_path=slide_path, threads=reader_threads) as tiles:
        features = embed_tiles(encoder, tiles, batch_size=batch_size, device=device, label=slide_id)
    seconds = time.perf_counter() - started
    log.info(
        "%s: %d tiles embedded in %.1f s (%.1f tiles/s) on %s",
        slide_id,
        len(features),
        seconds,
        len(features) / max(seconds, 1e-9),
        device,
    )
    attrs = {"slide_id": slide_id, **encoder.describe(), "device_type": device.type}
    with stores.atomic_store(out_store, kind=stores.FEATURES, attrs=attrs) as group:
        stores.write_array(group, "features", features, chunk_rows=4096)
    return len(features)


def reembed_slide(
    *,
    slide_id: str,
    attack_store: str | Path,
    encoder: TileEncoder,
    batch_size: int,
    device: torch.device,
    out_store: str | Path,
) -> int:
    """Embed only the k adversarial tiles (same code path and precision as clean extraction).

    ``encoder`` may differ from the one the tiles were perturbed with (a transfer attack's
    target): the store is then marked black-box (``params.threat_marking``)."""
    attack = stores.open_store(attack_store, kind=stores.ATTACK)
    index = np.asarray(attack["index"][...])
    features = embed_tiles(
        encoder, attack["adv_tiles"], batch_size=batch_size, device=device, label=f"{slide_id} (adversarial)"
    )
    attrs = {
        "slide_id": slide_id,
        **encoder.describe(),
        "attack": attack.attrs["attack"],
        **threat_marking(attack.attrs["attack"], encoder=encoder.spec.name),
        "perturbed_with": attack.attrs.get("encoder", {}).get("encoder"),  # the surrogate, for a transfer attack
        "device_type": device.type,
    }
    with stores.atomic_store(out_store, kind=stores.REEMBEDDED, attrs=attrs) as group:
        stores.write_array(group, "index", index)
        stores.write_array(group, "features", features)
        for name, values in achieved_change(attack).items():  # the evaluation reports it next to the effect
            stores.write_array(group, name, values)
    return len(index)


def achieved_change(attack) -> dict[str, np.ndarray]:
    """Per perturbed tile, the stored tile's L-inf and RMS pixel change (``stores.ACHIEVED_CHANGE``;
    RMS = L2 / sqrt(C·H·W), in the same [0, 1] units as L-inf and as ``eps``)."""
    if "linf" not in attack:  # k = 0: nothing stored
        return {name: np.empty(0, np.float32) for name in stores.ACHIEVED_CHANGE}
    n_values = int(np.prod(attack["adv_tiles"].shape[1:]))
    rms = np.asarray(attack["l2"][...], dtype=np.float64) / np.sqrt(n_values)
    return {"linf": np.asarray(attack["linf"][...], dtype=np.float32), "rms": rms.astype(np.float32)}
