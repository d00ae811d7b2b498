"""On-disk contracts: the zarr v3 stores every rule reads and writes, in one place.

Layouts (one zarr v3 group per slide, see README "On-disk layout"):

- tiles store     ``tiles`` uint8 (N, T, T, 3), ``coords`` int64 (N, 2) level-0 (x, y);
                  attrs ``kind="tiles"`` plus slide identity and the tiling spec.
- features store  ``features`` float32 (N, D), same order as the tiles; attrs encoder identity.
- attack store    ``index`` int64 (k,), ``adv_tiles`` uint8 (k, T, T, 3) and per-tile stats
                  (``linf``, ``l2``, ``objective_before_rounding``, ``objective``); attrs spec, seed.
- reembedded store  ``index`` int64 (k,), ``features`` float32 (k, D): only the replaced rows.

Every store is written into a temporary sibling directory and renamed into place, so a killed
job never leaves a store that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from wsiattack import __version__
from wsiattack.errors import StoreError

TILES = "tiles"
FEATURES = "features"
ATTACK = "attack"
REEMBEDDED = "reembedded"

# Tiles per chunk along N: small enough that the extraction loader can prefetch chunk by chunk,
# large enough to keep the number of files per store modest.
TILES_PER_CHUNK = 16
_COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
# Our chunks are never all fill value; zarr's per-chunk emptiness check costs as much as
# compressing (measured by tests/benchmarks/bench_tiling.py), so it is switched off.
_ARRAY_CONFIG = {"write_empty_chunks": True}


def _json_safe(value: Any) -> Any:
    """Round-trip through JSON so attrs hold only plain types (and compare equal when re-read)."""
    return json.loads(json.dumps(value, sort_keys=True))


@contextlib.contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling path to write a file to; rename it to ``path`` on success only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_store(path: Path | str, *, kind: str, attrs: Mapping[str, Any]) -> Iterator[zarr.Group]:
    """Yield a fresh zarr v3 group at a temporary path; rename it to ``path`` on success only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        group.attrs.update(_json_safe({"kind": kind, "wsiattack_version": __version__, **attrs}))
        yield group
        if path.exists():  # Snakemake removes outputs before a job; a manual re-run may not.
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def open_store(path: Path | str, *, kind: str) -> zarr.Group:
    """Open a finished store read-only and check that it is of the expected kind."""
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise StoreError(f"{path}: not a wsiattack store (no zarr.json)")
    group = zarr.open_group(path, mode="r", zarr_format=3)
    found = group.attrs.get("kind")
    if found != kind:
        raise StoreError(f"{path}: expected a {kind!r} store, found {found!r}")
    return group


def open_tiles(path: Path | str, *, expected: Mapping[str, Any]) -> zarr.Group:
    """Open a tiles store, refusing one whose tiling spec differs from ``expected``
    (``tiling.expected_tiles_attrs``): its tiles would not be the ones the config describes."""
    group = open_store(path, kind=TILES)
    require_attrs(group, path=path, expected=expected)
    return group


def require_attrs(group: zarr.Group, *, path: Path | str, expected: Mapping[str, Any]) -> None:
    """Refuse a store whose recorded spec differs from the one the current job expects."""
    expected = _json_safe(dict(expected))
    for key, value in expected.items():
        found = group.attrs.get(key)
        if found != value:
            raise StoreError(
                f"{path}: attribute {key!r} is {found!r} but the current spec needs {value!r}; "
                "delete the store or re-run the workflow so it is rebuilt"
            )


def create_tiles_array(group: zarr.Group, *, n_tiles: int, tile_px: int) -> zarr.Array:
    return group.create_array(
        "tiles",
        shape=(n_tiles, tile_px, tile_px, 3),
        chunks=(TILES_PER_CHUNK, tile_px, tile_px, 3),
        dtype="uint8",
        compressors=_COMPRESSOR,
        config=_ARRAY_CONFIG,
    )


def write_array(group: zarr.Group, name: str, data: np.ndarray, *, chunk_rows: int | None = None) -> None:
    """Write a whole array at once (features, coords, indices, per-tile stats)."""
    data = np.ascontiguousarray(data)
    chunks = None if chunk_rows is None else (chunk_rows, *data.shape[1:])
    array = group.create_array(
        name, shape=data.shape, dtype=data.dtype, chunks=chunks or "auto", compressors=_COMPRESSOR, config=_ARRAY_CONFIG
    )
    if data.size:
        array[...] = data


def write_tile_batch(group: zarr.Group, name: str, data: np.ndarray) -> None:
    """Write a uint8 (k, T, T, 3) batch of tiles chunked like a tiles store."""
    array = group.create_array(
        name,
        shape=data.shape,
        chunks=(max(1, min(TILES_PER_CHUNK, len(data))), *data.shape[1:]),
        dtype="uint8",
        compressors=_COMPRESSOR,
        config=_ARRAY_CONFIG,
    )
    if len(data):
        array[...] = data


def skipped_slides(tile_stores: list[str | Path]) -> list[dict[str, str]]:
    """(slide_id, reason) of tiles stores written empty (``tiling.skip_empty``: no tissue)."""
    rows = []
    for path in tile_stores:
        attrs = open_store(path, kind=TILES).attrs
        if attrs.get("skipped"):
            rows.append({"slide_id": attrs["slide_id"], "reason": attrs["skipped"]})
    return rows
