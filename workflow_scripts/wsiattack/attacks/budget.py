"""Per-slide budget (how many tiles) and tile selection (which tiles)."""

from __future__ import annotations

import zlib

import numpy as np


def tiles_to_attack(n_tiles: int, *, fraction: float, min_tiles: int) -> int:
    """k = round(fraction · N), at least ``min_tiles``, at most N."""
    return int(min(n_tiles, max(min_tiles, round(fraction * n_tiles))))


def slide_rng(seed: int, slide_id: str) -> np.random.Generator:
    """A generator that depends on the attack seed and the slide, not on job order or hash seeds.

    Two attacks with the same seed and budget therefore pick the same tiles of a slide, which is
    what makes an attack and its noise control comparable.
    """
    return np.random.default_rng([seed, zlib.crc32(slide_id.encode())])


def select_tiles(n_tiles: int, k: int, *, strategy: str, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of the k tiles to perturb."""
    if strategy != "random":
        raise ValueError(f"unknown selection {strategy!r} (known: random)")
    return np.sort(rng.choice(n_tiles, size=k, replace=False)).astype(np.int64)
