"""Levels 1..n of a store from level 0: 2x2 mean of the scores, 2x2 mode of the labels.

Each Dask task reads a 2x2 block of write units (chunks or shards) from the level above (at
most ``4 * C * tile**2`` bytes) and writes one whole unit of the level below, so tasks never
share a chunk or shard and memory is bounded whatever the slide size. Only units above written
chunks are visited (see :func:`build_levels`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import dask
import numpy as np
import zarr

ChunkIndex = tuple[int, int]


def build_levels(
    levels: list[tuple[zarr.Array, zarr.Array]],
    written: Iterable[ChunkIndex] | None = None,
    client: Any = None,
) -> None:
    """Fill each level's (scores, labels) from the previous one, level by level.

    Only the parents of ``written`` level-0 chunks (all chunks when None) are computed, and
    their parents in turn: on a slide that is mostly glass, the unwritten chunks read as
    background on every level anyway, so the pyramid costs what the tissue costs.
    """
    current = set(written) if written is not None else set(_all_units(levels[0][1]))
    for (scores_above, labels_above), (scores, labels) in itertools.pairwise(levels):
        parents = sorted({(iy // 2, ix // 2) for iy, ix in current})
        tasks = [
            dask.delayed(_write_parent)(above, target, index, reduce)
            for above, target, reduce in (
                (scores_above, scores, _mean_2x2),
                (labels_above, labels, mode_2x2),
            )
            for index in parents
        ]
        dask.compute(*tasks, scheduler=client if client is not None else "threads")
        current = set(parents)


def build_layer_levels(
    levels: list[zarr.Array],
    reduce: Callable[[np.ndarray], np.ndarray],
    written: Iterable[ChunkIndex] | None = None,
    client: Any = None,
) -> None:
    """Fill levels 1..n of a single-array layer with ``reduce`` (:func:`mean_nonzero_2x2` for the
    confidence, :func:`mode_2x2` for QC's artifacts), visiting only what :func:`build_levels` visits."""
    current = set(written) if written is not None else set(_all_units(levels[0]))
    for above, target in itertools.pairwise(levels):
        parents = sorted({(iy // 2, ix // 2) for iy, ix in current})
        tasks = [dask.delayed(_write_parent)(above, target, index, reduce) for index in parents]
        dask.compute(*tasks, scheduler=client if client is not None else "threads")
        current = set(parents)


def _all_units(array: zarr.Array) -> Iterator[ChunkIndex]:
    unit = write_unit(array)
    rows, cols = (-(-n // u) for n, u in zip(array.shape[-2:], unit[-2:], strict=True))
    return itertools.product(range(rows), range(cols))


def _write_parent(
    source: zarr.Array, target: zarr.Array, index: ChunkIndex, reduce: Callable[[np.ndarray], np.ndarray]
) -> None:
    """Write ``target``'s write unit ``index`` from the 2x2 units above it: one whole unit, once."""
    unit_h, unit_w = write_unit(target)[-2:]
    y0, x0 = index[0] * unit_h, index[1] * unit_w
    block = np.asarray(source[..., 2 * y0 : 2 * (y0 + unit_h), 2 * x0 : 2 * (x0 + unit_w)])
    out = reduce(block)
    target[..., y0 : y0 + out.shape[-2], x0 : x0 + out.shape[-1]] = out


def write_unit(array: zarr.Array) -> tuple[int, ...]:
    """The smallest region one process may write alone: the shard if sharded, else the chunk."""
    return tuple(array.shards or array.chunks)


def _blocks_2x2(block: np.ndarray) -> np.ndarray:
    """The four pixels of every 2x2 block stacked on a new first axis; odd edges repeat."""
    pad = [(0, 0)] * (block.ndim - 2) + [(0, block.shape[-2] % 2), (0, block.shape[-1] % 2)]
    even = np.pad(block, pad, mode="edge")
    return np.stack([even[..., dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)])


def _mean_2x2(block: np.ndarray) -> np.ndarray:
    """Mean of each 2x2 block, rounded half up (an odd edge averages the pixels that exist)."""
    total = _blocks_2x2(block).astype(np.uint16).sum(axis=0)
    return ((total + 2) // 4).astype(np.uint8)


def mean_nonzero_2x2(block: np.ndarray) -> np.ndarray:
    """Mean of the non-zero pixels of each 2x2 block, rounded half up; 0 where all four are 0.

    For the confidence: 0 means "no prediction" (glass), so it must not pull down the confidence
    of the tissue pixels it borders on a coarser level.
    """
    four = _blocks_2x2(block).astype(np.uint16)
    total, count = four.sum(axis=0), np.count_nonzero(four, axis=0).astype(np.uint16)
    return np.where(count > 0, (2 * total + count) // np.maximum(2 * count, 1), 0).astype(np.uint8)


def mode_2x2(block: np.ndarray) -> np.ndarray:
    """Most frequent label of each 2x2 block; ties go to the smaller label (as scipy's mode).

    Vectorised: each of the four candidates scores ``count * 256 + (255 - value)``, so the
    largest score is the most frequent value and, among equals, the smallest.
    """
    four = _blocks_2x2(block)
    counts = (four[:, None] == four[None, :]).sum(axis=1).astype(np.int32)
    score = counts * 256 + (255 - four.astype(np.int32))
    return np.take_along_axis(four, score.argmax(axis=0)[None], axis=0)[0]
