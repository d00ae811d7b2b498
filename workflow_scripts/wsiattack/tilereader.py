"""The one way every stage gets a tile's pixels: ``TileReader`` over a tiles store.

A tiles store holds coordinates and the tiling geometry (``tiling``); by default no pixels.
``TileReader`` then re-reads the requested tiles from the slide exactly as tiling planned them:
the tiles are grouped into the same read blocks (one ``read_region`` per block, so each JPEG
tile of the slide is decoded about once), and every tile is cut (or resized) from its own
window of level pixels, so a tile's bytes are the same whichever stage reads it and whichever
other tiles are read with it. A store written with ``tiling.store_pixels: true`` is read from its
``tiles`` array instead; both give identical pixels.

Background reading: ``iter_batches`` decodes blocks on ``threads`` reader threads (OpenSlide and
Pillow release the GIL) while the caller runs the model on the previous batch, with a bounded
number of blocks in flight, so memory does not grow with the slide.

The reader looks like a read-only uint8 (N, T, T, 3) array (``shape``, slicing,
``get_orthogonal_selection``), so code written for a pixel array works on it unchanged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from wsiattack import stores
from wsiattack.errors import StoreError

# Blocks decoded ahead of the consumer per reader thread: enough to hide the variation between
# blocks, few enough that ~2 blocks of 2048 px per thread (~25 MB each) bound the memory.
BLOCKS_AHEAD_PER_THREAD = 2


class TileReader:
    """Read-only uint8 (N, T, T, 3) view of a tiles store's tiles. Close it (or use ``with``)."""

    def __init__(self, store_path: str | Path, *, slide_path: str | Path | None = None, threads: int = 1):
        self.store_path = Path(store_path)
        self.group = stores.open_store(store_path, kind=stores.TILES)
        self._pixels = self.group["tiles"] if "tiles" in self.group else None
        if self._pixels is None and "geometry" not in self.group.attrs:
            raise StoreError(f"{store_path}: a tiles store with neither pixels nor a tiling geometry; re-run tiling")
        self.coords = (
            np.asarray(self.group["coords"][...])
            if "coords" in self.group
            else np.zeros((self._pixels.shape[0], 2), dtype=np.int64)
        )
        self.threads = max(1, int(threads))
        self.tile_px = (
            int(self._pixels.shape[1]) if self._pixels is not None else int(self.group.attrs["geometry"]["tile_px"])
        )
        self._slide_path = slide_path
        self._slide = None
        self._geometry = None

    # --- array-like interface ------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.coords), self.tile_px, self.tile_px, 3)

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError("TileReader supports slices; use read(index) for a list of tiles")
        return self.read(np.arange(len(self))[key])

    def get_orthogonal_selection(self, selection: tuple[np.ndarray]) -> np.ndarray:
        return self.read(np.asarray(selection[0]))

    # --- reading ---------------------------------------------------------------------------------
    def read(self, index: np.ndarray) -> np.ndarray:
        """uint8 (k, T, T, 3) of the tiles ``index`` (any order, repeats allowed), in that order."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        out = np.empty((len(index), self.tile_px, self.tile_px, 3), dtype=np.uint8)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"{self.store_path}: tile index out of range [0, {len(self)})")
        for positions, tiles in self._read_groups(index):
            out[positions] = tiles
        return out

    def iter_batches(self, *, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, uint8 batch) over all tiles in store order, decoded ahead in threads."""
        buffer, filled, start = np.empty((batch_size, self.tile_px, self.tile_px, 3), dtype=np.uint8), 0, 0
        for _, tiles in self._read_groups(np.arange(len(self)), background=True):
            taken = 0
            while taken < len(tiles):
                n = min(batch_size - filled, len(tiles) - taken)
                buffer[filled : filled + n] = tiles[taken : taken + n]
                filled, taken = filled + n, taken + n
                if filled == batch_size:
                    yield start, buffer.copy()
                    start, filled = start + batch_size, 0
        if filled:
            yield start, buffer[:filled].copy()

    def _read_groups(self, index: np.ndarray, *, background: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions in ``index``, their tiles) group by group: read blocks, or pixel chunks."""
        if not len(index):
            return
        if self._pixels is not None:
            chunk = self._pixels.chunks[0] * 4
            for s in range(0, len(index), chunk):
                positions = np.arange(s, min(s + chunk, len(index)))
                yield positions, np.asarray(self._pixels.get_orthogonal_selection((index[positions],)))
            return
        from wsiattack import tiling  # needs OpenSlide (envs/slides.yaml and the GPU envs)

        slide, geometry = self._open_slide()
        cells = geometry.cells(self.coords[index])
        order, _ = tiling.block_order(cells, block_cells=tiling.block_cells(geometry))
        blocks = tiling.plan_blocks(cells, block_cells=tiling.block_cells(geometry))
        bounds = np.cumsum([0] + [len(b.cells) for b in blocks])
        groups = [order[bounds[i] : bounds[i + 1]] for i in range(len(blocks))]

        def read(i: int) -> np.ndarray:
            return tiling.read_block(blocks[i], slide=slide, geometry=geometry)

        results = (
            _map_ahead(read, range(len(blocks)), threads=self.threads) if background else map(read, range(len(blocks)))
        )
        yield from zip(groups, results, strict=True)

    def _open_slide(self):
        if self._slide is None:
            from wsiattack import slides, tiling

            attrs = self.group.attrs
            path = Path(self._slide_path or attrs["source"]["path"])
            _check_same_slide(path, recorded=attrs["source"], store_path=self.store_path)
            self._slide = slides.open_slide(path, slide_id=attrs["slide_id"], mpp_override=attrs["source_mpp"])
            self._geometry = tiling.TileGeometry(**attrs["geometry"])
        return self._slide, self._geometry

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def __enter__(self) -> TileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_same_slide(path: Path, *, recorded: dict, store_path: Path) -> None:
    """The slide must be the file that was tiled: coordinates mean nothing on another one."""
    from wsiattack import slides

    if not path.is_file():
        raise StoreError(
            f"{store_path}: its slide {path} is missing; the tiles store holds coordinates only, so the slide must stay readable"
        )
    found = slides.source_identity(path)
    if (found["size_bytes"], found["sha256_head_tail"]) != (recorded["size_bytes"], recorded["sha256_head_tail"]):
        raise StoreError(
            f"{store_path}: {path} is not the slide that was tiled (size or content changed); re-run tiling for it"
        )


def _map_ahead(function, items, *, threads: int) -> Iterator[np.ndarray]:
    """``map`` on a pool of ``threads`` background threads (at least one, unlike
    ``slides.map_bounded``, so that decoding overlaps the caller), results in order."""
    pending: deque[Future[np.ndarray]] = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tile-reader") as pool:
        try:
            for item in items:
                if len(pending) >= BLOCKS_AHEAD_PER_THREAD * threads:
                    yield pending.popleft().result()
                pending.append(pool.submit(function, item))
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
