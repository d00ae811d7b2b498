"""Shards: the stable partition of a cohort that the GPU rules' jobs work through.

A slide's shard is the SHA-256 of its id modulo the configured count (``shards``), so it depends
on nothing but the id and the count: adding or removing a slide changes exactly one shard, and
every machine computes the same partition. Within a shard, slides keep the sample sheet's order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

SHARD_PATTERN = r"shard-\d+"


def shard_of(slide_id: str, *, n_shards: int) -> str:
    """``shard-0003``: the shard of ``slide_id`` among ``n_shards``."""
    index = int.from_bytes(hashlib.sha256(slide_id.encode()).digest()[:8], "big") % n_shards
    return f"shard-{index:04d}"


def partition(slide_ids: Iterable[str], *, n_shards: int) -> dict[str, list[str]]:
    """Shard -> its slides (sample-sheet order), for the shards that have any, sorted by name."""
    members: dict[str, list[str]] = {}
    for slide_id in slide_ids:
        members.setdefault(shard_of(slide_id, n_shards=n_shards), []).append(slide_id)
    return dict(sorted(members.items()))
