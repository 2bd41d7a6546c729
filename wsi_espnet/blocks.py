"""Inference blocks: rectangles of output chunks that the network sees as one window.

Storage chunks stay the unit of writing (one task writes each, whole, once); the network runs on
*blocks*, a rectangle of chunks plus one halo around the whole rectangle. A lone 512-px chunk
with a 256-px halo costs 4 input pixels per output pixel; a 4 x 4 block costs 1.56. Blocks are
planned only from chunks that need inference and follow the tissue: a rectangle is chosen for
what it costs per chunk it owns, so a window that is mostly glass is never inferred just to fill
a block, and a lone fragment falls back to a lone chunk.

Costs count full-size windows, as they are computed: an edge chunk clipped by the slide still
costs its whole window. ``amplification`` and ``halo_union_floor`` divide by ``tile**2`` per
chunk for the same reason, so one chunk alone scores ``((tile + 2 * halo) / tile) ** 2``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from wsi_espnet.grid import Chunk, TileGrid

ChunkIndex = tuple[int, int]


@dataclass(frozen=True)
class Block:
    """A ``rows`` x ``cols`` rectangle of the chunk grid at (``row0``, ``col0``) and the chunks it owns.

    ``owned`` are the selected chunks inside it that this block, and no other, writes (raster
    order). Unselected chunks inside are computed with the rest of the window and dropped.
    """

    row0: int
    col0: int
    rows: int
    cols: int
    owned: tuple[ChunkIndex, ...]

    def window(self, grid: TileGrid) -> tuple[int, int, int, int]:
        """(y, x, height, width) of the network input in analysis pixels: core plus halo each side.

        The origin is a multiple of 8 when tile and halo are; the window may reach outside the
        slide (read as white), exactly like a single chunk's window.
        """
        return (
            self.row0 * grid.tile - grid.halo,
            self.col0 * grid.tile - grid.halo,
            self.rows * grid.tile + 2 * grid.halo,
            self.cols * grid.tile + 2 * grid.halo,
        )

    def input_pixels(self, grid: TileGrid) -> int:
        """Pixels the network computes for this block (the full window)."""
        _, _, h, w = self.window(grid)
        return h * w

    def core_slices(self, grid: TileGrid, chunk: Chunk) -> tuple[slice, slice]:
        """Where ``chunk``'s own (clipped) pixels sit in this block's halo-cropped output."""
        y = (chunk.index[0] - self.row0) * grid.tile
        x = (chunk.index[1] - self.col0) * grid.tile
        return slice(y, y + chunk.h), slice(x, x + chunk.w)


def owned_chunks(blocks: Iterable[Block]) -> list[ChunkIndex]:
    """Every chunk the ``blocks`` own, block by block: what the task that runs them writes
    (its statistics partials, its pyramid parents, the GeoJSON rows it finishes)."""
    return [index for block in blocks for index in block.owned]


def _selection_mask(selected: Iterable[Chunk | ChunkIndex], grid: TileGrid) -> np.ndarray:
    """Boolean (rows, cols) grid mask of the selected chunks (Chunk objects or (row, col) indices)."""
    mask = np.zeros(grid.grid_shape, bool)
    for item in selected:
        row, col = item.index if isinstance(item, Chunk) else item
        mask[row, col] = True
    return mask


def _window_cost(rows: np.ndarray | int, cols: np.ndarray | int, grid: TileGrid) -> np.ndarray:
    return (np.asarray(rows) * grid.tile + 2 * grid.halo) * (np.asarray(cols) * grid.tile + 2 * grid.halo)


def plan_blocks(selected: Iterable[Chunk | ChunkIndex], grid: TileGrid, max_chunks_side: int) -> list[Block]:
    """Cover the selected chunks with blocks of at most ``max_chunks_side`` chunks a side.

    Minimises the total network input exactly over *band* layouts: the grid is cut into bands
    of whole chunk rows (at most ``max_chunks_side`` high), each band into runs of columns, and
    each run becomes one block trimmed to the rows of the band that hold selected chunks there.
    Runs with no tissue are skipped, so glass between fragments is never inferred, and a run is
    only as wide as it pays: the lone chunk is always an option, so no block costs more than
    inferring its chunks one by one. The same is solved on the transposed grid (bands of
    columns) and the cheaper plan is kept. Blocks never overlap: every selected chunk is owned by
    exactly one. Dynamic programming over (band, column), vectorised across bands:
    O(rows * cols * k^2) array work, a few milliseconds for a 40x biopsy.
    """
    k = max_chunks_side
    if k < 1:
        raise ValueError(f"max_chunks_side must be at least 1, got {k}")
    mask = _selection_mask(selected, grid)
    if not mask.any():
        return []
    rows, cols = np.nonzero(mask)
    r0, c0 = int(rows.min()), int(cols.min())
    box = mask[r0 : rows.max() + 1, c0 : cols.max() + 1]  # work on the tissue's bounding box only
    plans = []
    for transposed in (False, True):
        cost, rects = _band_plan(box.T if transposed else box, grid, k)
        if transposed:
            rects = [(c, r, nc, nr) for r, c, nr, nc in rects]
        plans.append((cost, rects))
    _, rects = min(plans, key=lambda plan: plan[0])
    blocks = []
    for r, c, nr, nc in sorted(rects):
        area = box[r : r + nr, c : c + nc]
        owned = tuple((r0 + r + int(i), c0 + c + int(j)) for i, j in zip(*np.nonzero(area), strict=True))
        blocks.append(Block(r0 + r, c0 + c, nr, nc, owned))
    return blocks


def _band_plan(mask: np.ndarray, grid: TileGrid, k: int) -> tuple[float, list[tuple[int, int, int, int]]]:
    """(total cost, [(row0, col0, rows, cols)]) of the cheapest band layout of ``mask``."""
    n_rows, n_cols = mask.shape
    big = n_rows + 1
    # Nearest selected row at or below / at or above each cell, per column.
    index = np.where(mask, np.arange(n_rows)[:, None], big)
    below = np.minimum.accumulate(index[::-1], axis=0)[::-1]
    above = np.maximum.accumulate(np.where(mask, np.arange(n_rows)[:, None], -1), axis=0)
    bands = [(r, h) for h in range(1, k + 1) for r in range(n_rows - h + 1)]
    start = np.array([r for r, _ in bands])
    height = np.array([h for _, h in bands])
    top = below[start]  # first selected row of each band and column (>= start)
    bottom = above[start + height - 1]  # last one (< start + height)
    top = np.where(top < start[:, None] + height[:, None], top, big)
    bottom = np.where(bottom >= start[:, None], bottom, -1)
    empty = top > bottom
    best = np.zeros((len(bands), n_cols + 1))
    choice = np.zeros((len(bands), n_cols + 1), np.int16)  # run width ending at column c; 0 = skip
    for c in range(1, n_cols + 1):
        best[:, c] = np.where(empty[:, c - 1], best[:, c - 1], np.inf)
        seg_top, seg_bottom = np.full(len(bands), big), np.full(len(bands), -1)
        for w in range(1, min(k, c) + 1):
            seg_top = np.minimum(seg_top, top[:, c - w])
            seg_bottom = np.maximum(seg_bottom, bottom[:, c - w])
            cost = _window_cost(np.maximum(seg_bottom - seg_top + 1, 0), w, grid)
            total = np.where(seg_top <= seg_bottom, best[:, c - w] + cost, np.inf)
            better = total < best[:, c]
            best[:, c] = np.where(better, total, best[:, c])
            choice[:, c] = np.where(better, w, choice[:, c])
    band_cost = dict(zip(bands, best[:, n_cols], strict=True))
    band_id = {band: i for i, band in enumerate(bands)}
    # Rows: the cheapest sequence of bands (an all-glass row may be skipped).
    row_best = np.full(n_rows + 1, np.inf)
    row_best[0] = 0.0
    row_choice = np.zeros(n_rows + 1, np.int16)
    glass_row = ~mask.any(1)
    for r in range(1, n_rows + 1):
        if glass_row[r - 1]:
            row_best[r] = row_best[r - 1]
        for h in range(1, min(k, r) + 1):
            total = row_best[r - h] + band_cost[(r - h, h)]
            if total < row_best[r]:
                row_best[r], row_choice[r] = total, h
    rects = []
    r = n_rows
    while r > 0:
        h = int(row_choice[r])
        if h == 0:
            r -= 1
            continue
        b = band_id[(r - h, h)]
        c = n_cols
        while c > 0:
            w = int(choice[b, c])
            if w:
                seg_top = int(top[b, c - w : c].min())
                seg_bottom = int(bottom[b, c - w : c].max())
                rects.append((seg_top, c - w, seg_bottom - seg_top + 1, w))
            c -= max(w, 1)
        r -= h
    return float(row_best[n_rows]), rects


def fixed_blocks(selected: Iterable[Chunk | ChunkIndex], grid: TileGrid, chunks_side: int) -> list[Block]:
    """Blocks of a fixed grid of ``chunks_side``-chunk squares (clipped to the grid) that hold a
    selected chunk: the naive layout, kept to measure what following the tissue gains."""
    mask = _selection_mask(selected, grid)
    n_rows, n_cols = mask.shape
    blocks = []
    for row0 in range(0, n_rows, chunks_side):
        for col0 in range(0, n_cols, chunks_side):
            area = mask[row0 : row0 + chunks_side, col0 : col0 + chunks_side]
            if area.any():
                owned = tuple((row0 + int(r), col0 + int(c)) for r, c in zip(*np.nonzero(area), strict=True))
                blocks.append(Block(row0, col0, area.shape[0], area.shape[1], owned))
    return blocks


def amplification(blocks: list[Block], grid: TileGrid) -> float:
    """Network input pixels ÷ output chunk pixels (``tile**2`` per owned chunk)."""
    owned = sum(len(b.owned) for b in blocks)
    if not owned:
        return 0.0
    return sum(b.input_pixels(grid) for b in blocks) / (owned * grid.tile**2)


def halo_union_floor(selected: Iterable[Chunk | ChunkIndex], grid: TileGrid) -> float:
    """The least any seamless tiling must compute: area of the union of every selected chunk's
    halo window (chunk + halo each side, overlaps counted once, not clipped to the slide) ÷ the
    selected chunks' area (``tile**2`` each).

    Exact, on compressed coordinates: along each axis the windows start and end only at
    ``i * tile ± halo``, so coverage is constant on the cells between consecutive such values.
    """
    mask = _selection_mask(selected, grid)
    if not mask.any():
        return 0.0
    t, h = grid.tile, grid.halo
    edges_y = _window_edges(mask.shape[0], t, h)
    edges_x = _window_edges(mask.shape[1], t, h)
    # Window of chunk (r, c) covers cells [start[r], stop[r]) along y (likewise x).
    start_y, stop_y = (
        np.searchsorted(edges_y, np.arange(mask.shape[0]) * t - h),
        np.searchsorted(edges_y, np.arange(1, mask.shape[0] + 1) * t + h),
    )
    start_x, stop_x = (
        np.searchsorted(edges_x, np.arange(mask.shape[1]) * t - h),
        np.searchsorted(edges_x, np.arange(1, mask.shape[1] + 1) * t + h),
    )
    rows, cols = np.nonzero(mask)
    paint = np.zeros((edges_y.size, edges_x.size), np.int32)  # 2-D difference array
    np.add.at(paint, (start_y[rows], start_x[cols]), 1)
    np.add.at(paint, (start_y[rows], stop_x[cols]), -1)
    np.add.at(paint, (stop_y[rows], start_x[cols]), -1)
    np.add.at(paint, (stop_y[rows], stop_x[cols]), 1)
    covered = paint.cumsum(0).cumsum(1)[:-1, :-1] > 0
    area = np.diff(edges_y)[:, None] * np.diff(edges_x)[None, :]
    return float((covered * area).sum()) / (mask.sum() * t * t)


def _window_edges(n: int, tile: int, halo: int) -> np.ndarray:
    """Sorted distinct coordinates where a halo window along one axis of ``n`` chunks starts or ends."""
    starts = np.arange(n) * tile - halo
    return np.unique(np.concatenate([starts, starts + tile + 2 * halo]))
