"""Levels 1..n of a store from level 0: 2x2 mean of the scores, 2x2 mode of the labels.

Each Dask task reads a 2x2 block of write units (chunks or shards) from the level above (at
most ``4 * C * tile**2`` bytes) and writes one whole unit of the level below, so tasks never
share a chunk or shard and memory is bounded whatever the slide size.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr


def build_levels(levels: list[tuple[zarr.Array, zarr.Array]], client: Any = None) -> None:
    """Fill each level's (scores, labels) from the previous one, level by level."""
    for (scores_above, labels_above), (scores, labels) in itertools.pairwise(levels):
        pairs = [
            _downsample(scores_above, scores, _mean_2x2),
            _downsample(labels_above, labels, _mode_2x2),
        ]
        # da.store is what da.to_zarr calls for an existing array; called directly it keeps
        # our blocks, which are already aligned with the target's write units.
        tasks = da.store([s for s, _ in pairs], [t for _, t in pairs], lock=False, compute=False)
        dask.compute(tasks, scheduler=client if client is not None else "threads")


def write_unit(array: zarr.Array) -> tuple[int, ...]:
    """The smallest region one process may write alone: the shard if sharded, else the chunk."""
    return tuple(array.shards or array.chunks)


def _downsample(
    source: zarr.Array, target: zarr.Array, reduce: Callable[[np.ndarray], np.ndarray]
) -> tuple[da.Array, zarr.Array]:
    """Dask array of ``target``'s content, one block per target write unit (chunk or shard)."""
    unit = write_unit(target)
    read_chunks = (*unit[:-2], 2 * unit[-2], 2 * unit[-1])
    src = da.from_zarr(source, chunks=read_chunks)
    out_chunks = (*src.chunks[:-2], *(tuple((c + 1) // 2 for c in dim) for dim in src.chunks[-2:]))
    result = src.map_blocks(reduce, chunks=out_chunks, dtype=np.uint8)
    assert result.shape == target.shape, (result.shape, target.shape)
    return result, target


def _blocks_2x2(block: np.ndarray) -> np.ndarray:
    """The four pixels of every 2x2 block stacked on a new first axis; odd edges repeat."""
    pad = [(0, 0)] * (block.ndim - 2) + [(0, block.shape[-2] % 2), (0, block.shape[-1] % 2)]
    even = np.pad(block, pad, mode="edge")
    return np.stack([even[..., dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)])


def _mean_2x2(block: np.ndarray) -> np.ndarray:
    """Mean of each 2x2 block, rounded half up (an odd edge averages the pixels that exist)."""
    total = _blocks_2x2(block).astype(np.uint16).sum(axis=0)
    return ((total + 2) // 4).astype(np.uint8)


def _mode_2x2(block: np.ndarray) -> np.ndarray:
    """Most frequent label of each 2x2 block; ties go to the smaller label (as scipy's mode).

    Vectorised: each of the four candidates scores ``count * 256 + (255 - value)``, so the
    largest score is the most frequent value and, among equals, the smallest.
    """
    four = _blocks_2x2(block)
    counts = (four[:, None] == four[None, :]).sum(axis=1).astype(np.int32)
    score = counts * 256 + (255 - four.astype(np.int32))
    return np.take_along_axis(four, score.argmax(axis=0)[None], axis=0)[0]
