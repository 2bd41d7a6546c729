"""The output chunk grid at analysis resolution and its halo windows.

Output chunks are the unit of work and of storage: each is inferred from one fixed-size window
(the chunk plus a ``halo`` of context on every side, so tiles batch and borders see their
neighbours) and written whole, exactly once. Chunks on the right and bottom edges are partial
(their ``h``/``w`` are clipped to the slide) but their windows are not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from wsi_espnet.tissue import TissueMask


@dataclass(frozen=True)
class Chunk:
    """One output chunk: grid ``index`` (row, col) and its core box in analysis pixels."""

    index: tuple[int, int]
    y0: int
    x0: int
    h: int
    w: int


@dataclass(frozen=True)
class TileGrid:
    """Chunks of ``tile`` x ``tile`` analysis pixels covering ``shape`` (height, width)."""

    shape: tuple[int, int]
    tile: int
    halo: int

    def __post_init__(self) -> None:
        if self.tile < 1 or self.halo < 0 or min(self.shape) < 1:
            raise ValueError(f"invalid grid: shape={self.shape} tile={self.tile} halo={self.halo}")

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Number of chunk rows and columns."""
        return math.ceil(self.shape[0] / self.tile), math.ceil(self.shape[1] / self.tile)

    def chunk(self, index: tuple[int, int]) -> Chunk:
        """The chunk at grid ``index`` (row, col), clipped to the slide."""
        row, col = index
        y0, x0 = row * self.tile, col * self.tile
        h, w = min(self.tile, self.shape[0] - y0), min(self.tile, self.shape[1] - x0)
        return Chunk((row, col), y0, x0, h, w)

    @property
    def chunks(self) -> list[Chunk]:
        """All chunks, row by row."""
        rows, cols = self.grid_shape
        return [self.chunk((r, c)) for r in range(rows) for c in range(cols)]

    def window(self, chunk: Chunk) -> tuple[int, int, int, int]:
        """(y, x, height, width) of the model input for ``chunk``: always tile + 2 * halo square.

        It may reach outside the slide; :meth:`Slide.read_region` pads that with white.
        """
        size = self.tile + 2 * self.halo
        return chunk.y0 - self.halo, chunk.x0 - self.halo, size, size

    def core(self, chunk: Chunk) -> tuple[slice, slice]:
        """Where ``chunk``'s own pixels sit inside its :meth:`window` (the halo and edge overhang dropped)."""
        return slice(self.halo, self.halo + chunk.h), slice(self.halo, self.halo + chunk.w)

    def select(self, tissue: TissueMask, mpp: float) -> list[Chunk]:
        """Chunks whose core (not halo) holds tissue, judged as :meth:`TissueMask.region` would.

        Rather than resampling each chunk to analysis pixels, look up only the distinct mask
        pixels that the chunk's analysis pixels map to (a handful for a coarse mask).
        """
        ratio = mpp / tissue.mpp
        rows, cols = self.grid_shape
        # Mask rows/columns per chunk row/column: computed once, shared along the grid.
        mask_h, mask_w = tissue.mask.shape
        ys = [_mask_indices(k.y0, k.h, ratio, mask_h) for k in (self.chunk((r, 0)) for r in range(rows))]
        xs = [_mask_indices(k.x0, k.w, ratio, mask_w) for k in (self.chunk((0, c)) for c in range(cols))]
        selected = []
        for chunk in self.chunks:
            row_idx, col_idx = ys[chunk.index[0]], xs[chunk.index[1]]
            if row_idx.size and col_idx.size and tissue.mask[np.ix_(row_idx, col_idx)].any():
                selected.append(chunk)
        return selected


def _mask_indices(start: int, length: int, ratio: float, limit: int) -> np.ndarray:
    """Distinct mask indices hit by analysis pixels [start, start + length) (nearest, as region())."""
    idx = np.unique(np.floor((np.arange(start, start + length) + 0.5) * ratio).astype(np.int64))
    return idx[(idx >= 0) & (idx < limit)]
