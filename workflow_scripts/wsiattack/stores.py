"""On-disk contracts: the zarr v3 stores every rule reads and writes, in one place.

Layouts (one zarr v3 group per slide, see README "On-disk layout"):

- tiles store     ``coords`` int64 (N, 2) level-0 (x, y); ``tiles`` uint8 (N, T, T, 3) only with
                  ``tiling.store_pixels`` (otherwise ``tilereader.TileReader`` re-reads the pixels
                  from the slide); attrs ``kind="tiles"`` plus slide identity, the tiling spec and
                  the ``geometry`` (level, downsample, tile side in level-0 and level px).
- features store  ``features`` float32 (N, D), same order as the tiles; attrs encoder identity.
- attack store    ``index`` int64 (k,) sorted tile indices; ``adv_tiles`` uint8 (k, T, T, 3);
                  per tile: ``linf``, ``l2`` float32 (achieved distance of the stored uint8 tile,
                  pixel units in [0, 1]), ``objective_before_rounding`` and ``objective`` float32
                  (after uint8 rounding; for ``mil_cross_entropy`` the slide's joint loss),
                  ``iterations`` int32 (gradient evaluations spent), ``best_step`` int32 (step of
                  the kept iterate, 0 = the random start), ``selection_score`` float32 (the
                  selection's score of the tile: NaN for random, attention for attention);
                  masked methods (SNAP, ``attacks.snap``) add ``masks`` uint8 (k, T, T) (1 where
                  pixels may change), ``mask_area`` float32 (share of the tile) and ``mask_blobs``
                  int32 (blobs placed). attrs: ``attack`` (the normalised entry incl. name, seed, ``mil``), ``encoder``,
                  ``n_tiles``, ``k``, ``method_params`` (parameters actually used, ``step_size``
                  resolved), ``bound`` {norm, eps, radius} (radius in the norm's own units: eps,
                  or eps·sqrt(C·H·W) for L2), ``selection`` {strategy, probe_tiles,
                  probe_gradient_evaluations} and ``selection_probe_tiles``, ``label_free`` and
                  ``threat_model`` ("white-box" label-free, "gray-box" when a MIL head is used:
                  ``attacks.params.threat_marking``), ``mil_head`` {model, fold} (gray-box only).
                  A slide skipped for lack of tissue: k = 0 and ``skipped``.
- universal store   ``pattern`` int16 (T, T, 3): one universal perturbation in grey levels, learned
                  for one (attack, encoder, fold) on that fold's training slides; its training log
                  ``train_objective`` (per step), ``eval_step``/``eval_objective``; attrs the spec,
                  encoder, fold, ``training_tiles`` {slide: indices}, ``best_step``
                  (``attacks.universal``). Its attack stores also hold ``clipped`` per tile.
- reembedded store  ``index`` int64 (k,), ``features`` float32 (k, D): only the replaced rows;
                  ``linf``, ``rms`` float32 (k,): the stored tiles' L-inf and RMS pixel change (RMS
                  = L2 / sqrt(C·H·W), units of ``eps``); attrs encoder
                  identity, the ``attack`` entry and its ``label_free`` / ``threat_model`` marking.

The GPU rules write one directory per shard of slides (``shards``), holding one store per slide
(``{shard_dir}/{slide_id}.zarr``, see ``slide_store``): features, attack and re-embedded stores.

Every store is written into a temporary sibling directory and renamed into place, so a killed
job never leaves a store that looks complete; the next write of the same output removes the
temporary directory the killed job left.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from wsiattack import __version__
from wsiattack.atomic import atomic_dir, atomic_file  # noqa: F401 (re-exported: the one write path)
from wsiattack.errors import StoreError

TILES = "tiles"
FEATURES = "features"
ATTACK = "attack"
REEMBEDDED = "reembedded"
TILE_WEIGHTS = "tile_weights"
UNIVERSAL = "universal"  # one universal perturbation (attacks.universal)
BACKDOOR = "backdoor"  # one backdoor job's learned triggers and example tile (backdoor.run_backdoor)
ACHIEVED_CHANGE = ("linf", "rms")  # per perturbed tile, of the stored uint8 tile, pixel units

# Tiles per chunk along N: small enough that the extraction loader can prefetch chunk by chunk,
# large enough to keep the number of files per store modest.
TILES_PER_CHUNK = 16
_COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
# The tiles array is most of a store's bytes, and decoded JPEG tissue compresses little
# losslessly: tiles get a fast codec, which costs tiling the same CPU as none (see
# tests/benchmarks/bench_tiling.py for the speed and size of the alternatives).
_TILES_COMPRESSOR = BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle")
# Our chunks are never all fill value; zarr's per-chunk emptiness check costs as much as
# compressing (measured by tests/benchmarks/bench_tiling.py), so it is switched off.
_ARRAY_CONFIG = {"write_empty_chunks": True}


def _json_safe(value: Any) -> Any:
    """Round-trip through JSON so attrs hold only plain types (and compare equal when re-read)."""
    return json.loads(json.dumps(value, sort_keys=True))


@contextlib.contextmanager
def atomic_store(path: Path | str, *, kind: str, attrs: Mapping[str, Any]) -> Iterator[zarr.Group]:
    """Yield a fresh zarr v3 group at a temporary path; rename it to ``path`` on success only."""
    with atomic_dir(path) as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        group.attrs.update(_json_safe({"kind": kind, "wsiattack_version": __version__, **attrs}))
        yield group


def slide_store(shard_dir: Path | str, slide_id: str) -> Path:
    """Where a slide's store is inside a per-shard output directory."""
    return Path(shard_dir) / f"{slide_id}.zarr"


def slide_id_of(store_path: str | Path) -> str:
    """``results/features/demo/demo_003.zarr`` -> ``demo_003`` (stores are named by slide)."""
    return Path(store_path).name.removesuffix(".zarr")


def slide_stores(shard_dirs: Iterable[Path | str]) -> list[Path]:
    """Every slide's store in the given per-shard output directories (by directory, then name)."""
    return [store for shard_dir in shard_dirs for store in sorted(Path(shard_dir).glob("[!.]*.zarr"))]


def find_slide_store(shard_dirs: Iterable[Path | str], slide_id: str) -> Path:
    """The store of ``slide_id`` in whichever of ``shard_dirs`` holds it."""
    for shard_dir in shard_dirs:
        if (store := slide_store(shard_dir, slide_id)).exists():
            return store
    raise StoreError(f"no store for slide {slide_id!r} in {', '.join(map(str, shard_dirs))}")


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
        compressors=_TILES_COMPRESSOR,
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


def write_encoder_free_attack(
    path: Path | str,
    *,
    attrs: Mapping[str, Any],
    index: np.ndarray,
    clean: np.ndarray,
    adversarial: np.ndarray,
    clipped: np.ndarray,
    selection_score: np.ndarray | None,
) -> None:
    """An attack store made without an encoder (a shuffled control, a universal pattern applied):
    ``index``, ``adv_tiles``, their achieved ``linf`` / ``l2`` against ``clean`` (uint8, same
    shape), the share of ``clipped`` values per tile and, when given, ``selection_score``."""
    delta = (adversarial.astype(np.float32) - clean.astype(np.float32)).reshape(len(index), -1) / 255
    with atomic_store(path, kind=ATTACK, attrs=attrs) as group:
        write_array(group, "index", index)
        write_tile_batch(group, "adv_tiles", adversarial)
        write_array(group, "linf", np.abs(delta).max(axis=1, initial=0).astype(np.float32))
        write_array(group, "l2", np.linalg.norm(delta, axis=1).astype(np.float32))
        write_array(group, "clipped", clipped)
        if selection_score is not None:
            write_array(group, "selection_score", selection_score)


def skipped_slides(tile_stores: list[str | Path]) -> list[dict[str, str]]:
    """(slide_id, reason) of tiles stores written empty (``tiling.skip_empty``: no tissue)."""
    rows = []
    for path in tile_stores:
        attrs = open_store(path, kind=TILES).attrs
        if attrs.get("skipped"):
            rows.append({"slide_id": attrs["slide_id"], "reason": attrs["skipped"]})
    return rows
