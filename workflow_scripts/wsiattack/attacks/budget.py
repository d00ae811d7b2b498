"""Per-slide budget: how many tiles are perturbed, and the slide's random streams."""

from __future__ import annotations

import zlib

import numpy as np

from wsiattack.errors import ConfigError


def tiles_to_attack(n_tiles: int, *, fraction: float, min_tiles: int = 1, max_tiles: int | None = None) -> int:
    """k = round(fraction · N), clamped to [min_tiles, max_tiles], at most N.

    ``max_tiles`` caps the cost on very large slides (None: no cap); ``min_tiles`` makes small
    slides count at all. Both are counts of tiles.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"attack budget.fraction {fraction} must be in (0, 1]")
    if min_tiles < 1 or (max_tiles is not None and max_tiles < min_tiles):
        raise ConfigError(
            f"attack budget: need 1 <= min_tiles <= max_tiles, got min_tiles={min_tiles}, max_tiles={max_tiles}"
        )
    k = max(min_tiles, round(fraction * n_tiles))
    if max_tiles is not None:
        k = min(k, max_tiles)
    return int(min(n_tiles, k))


def slide_rng(seed: int, slide_id: str, *, stream: int = 0) -> np.random.Generator:
    """A generator that depends on the attack seed and the slide, not on job order or hash seeds.

    Two attacks with the same seed and budget therefore pick the same tiles of a slide, which is
    what makes an attack and its noise control comparable. ``stream`` > 0 gives independent
    streams (the vulnerability probe) without disturbing stream 0.
    """
    key = [seed, zlib.crc32(slide_id.encode())]
    return np.random.default_rng(key if stream == 0 else [*key, stream])
