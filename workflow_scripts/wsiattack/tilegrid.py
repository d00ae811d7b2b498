"""The tile grid: where tiles are on the slide (``TileGeometry``) and how the kept cells are grouped
into read blocks (``Block``, ``plan_blocks``) in the deterministic store order. NumPy only, so the
tile reader of every environment shares it with tiling (see ``tiling`` for resolution handling).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Side of a read block in pixels of the level read: big enough that per-call overhead and
# re-decoded boundary tiles stay small, small enough that a few blocks in flight fit in ~100 MB.
BLOCK_LEVEL_PX = 2048


@dataclass(frozen=True)
class TileGeometry:
    """Where the grid's tiles are on the slide and in the level read."""

    tile_px: int
    level: int
    downsample: float  # of the level read
    side0_px: float  # tile side in level-0 pixels
    side_level_px: float  # tile side in pixels of the level read

    def describe(self) -> dict[str, float | int]:
        """The tiles store's ``geometry`` attr; ``TileGeometry(**describe())`` rebuilds it."""
        return {
            "tile_px": self.tile_px,
            "level": self.level,
            "downsample": self.downsample,
            "side0_px": self.side0_px,
            "side_level_px": self.side_level_px,
        }

    def cells(self, coords: np.ndarray) -> np.ndarray:
        """Grid (row, col) of tiles given by level-0 ``coords`` (the inverse of ``coords``)."""
        return np.round(np.asarray(coords, dtype=np.float64)[:, ::-1] / self.side0_px).astype(np.int64).reshape(-1, 2)

    @property
    def resized(self) -> bool:
        return self.side_level_px != self.tile_px

    def coords(self, cells: np.ndarray) -> np.ndarray:
        """Level-0 (x, y) of the top-left corner of grid cells given as (row, col)."""
        return np.round(cells[:, ::-1] * self.side0_px).astype(np.int64).reshape(-1, 2)


@dataclass(frozen=True)
class Block:
    """A rectangle of grid cells read with one ``read_region``, and the kept cells inside it."""

    row0: int
    col0: int
    rows: int
    cols: int
    cells: np.ndarray  # (k, 2) kept (row, col), row-major


def block_cells(geometry: TileGeometry) -> int:
    """Cells per side of a read block."""
    return max(1, int(BLOCK_LEVEL_PX // geometry.side_level_px))


def plan_blocks(cells: np.ndarray, *, block_cells: int) -> list[Block]:
    """Group cells into blocks of ``block_cells`` x ``block_cells`` grid cells, each cropped to
    the bounding box of its kept cells; bands top to bottom, blocks left to right."""
    order, block_id = block_order(cells, block_cells=block_cells)
    if not len(order):
        return []
    groups = np.split(cells[order], np.flatnonzero(np.diff(block_id[order])) + 1)
    return [_bounding_block(group) for group in groups]


def block_order(cells: np.ndarray, *, block_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, block id) of cells: ``cells[order]`` is the concatenation of ``plan_blocks``'s
    blocks, and ``block_id[i]`` the block of cell ``i`` (row-major within a block)."""
    if not len(cells):
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    band, window = cells[:, 0] // block_cells, cells[:, 1] // block_cells
    order = np.lexsort((cells[:, 1], cells[:, 0], window, band))
    return order, band * (int(window.max()) + 1) + window


def _bounding_block(cells: np.ndarray) -> Block:
    row0, col0 = cells.min(axis=0)
    row1, col1 = cells.max(axis=0) + 1
    return Block(row0=int(row0), col0=int(col0), rows=int(row1 - row0), cols=int(col1 - col0), cells=cells)
