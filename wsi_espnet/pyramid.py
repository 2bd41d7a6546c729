"""Levels 1..n of a store from level 0: 2x2 mean of the scores, 2x2 mode of the labels.

Each parent unit is made from a 2x2 block of write units (chunks or shards) of the level above
(at most ``4 * C * tile**2`` bytes) and written whole, by one task, so tasks never share a chunk
or shard and memory is bounded whatever the slide size. Only units above written chunks are
visited. :func:`build_levels` builds a store's levels after the fact; ``segment`` instead submits
:func:`write_units` tasks as their children are written (:mod:`wsi_espnet.finalise`), grouped by
:func:`parents`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import zarr

ChunkIndex = tuple[int, int]


Reduce = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Layer:
    """Consecutive levels of one pyramid of the store (finest first; all of them from level 0
    for :func:`build_levels`, a source and its target for :func:`write_units`) and how a 2x2
    block of a level becomes one pixel of the next: :func:`mean_2x2` (scores), :func:`mode_2x2`
    (labels, QC's artifacts), :func:`mean_nonzero_2x2` (the confidence)."""

    levels: list[zarr.Array]
    reduce: Reduce


def build_levels(
    layers: list[Layer], written: Iterable[ChunkIndex] | None = None, client: Any = None
) -> None:
    """Fill levels 1..n of every layer from level 0, level by level, one task per parent unit.

    Only the parents of ``written`` level-0 chunks (all chunks when None) are computed, and
    their parents in turn: on a slide that is mostly glass, the unwritten chunks read as
    background on every level anyway, so the pyramid costs what the tissue costs. A task
    writes the same unit of every layer (the layers share the chunk grid): a quarter of the
    tasks that one task per layer and unit would need, and the Dask graph is what a 40x
    slide's pyramid spent a tenth of its time building.
    """
    if not layers:
        return
    current = set(written) if written is not None else set(_all_units(layers[0].levels[0]))
    for level in range(1, len(layers[0].levels)):
        units = sorted(parents(current))
        pairs = [Layer(layer.levels[level - 1 : level + 1], layer.reduce) for layer in layers]
        tasks = [dask.delayed(write_units)(pairs, [index]) for index in units]
        dask.compute(*tasks, scheduler=client if client is not None else "threads")
        current = set(units)


def parents(children: Iterable[ChunkIndex]) -> dict[ChunkIndex, list[ChunkIndex]]:
    """Each unit of the next level above ``children`` (unit indices of one level), with its
    children among them."""
    found: dict[ChunkIndex, list[ChunkIndex]] = {}
    for iy, ix in children:
        found.setdefault((iy // 2, ix // 2), []).append((iy, ix))
    return found


def _all_units(array: zarr.Array) -> Iterator[ChunkIndex]:
    unit = write_unit(array)
    rows, cols = (-(-n // u) for n, u in zip(array.shape[-2:], unit[-2:], strict=True))
    return itertools.product(range(rows), range(cols))


def write_units(layers: list[Layer], units: Iterable[ChunkIndex]) -> None:
    """Write ``units`` of each layer's second level from the 2x2 units of its first: each unit
    whole, once (the layers share the chunk grid, so one task serves them all)."""
    for index in units:
        for layer in layers:
            source, target = layer.levels
            unit_h, unit_w = write_unit(target)[-2:]
            y0, x0 = index[0] * unit_h, index[1] * unit_w
            block = np.asarray(source[..., 2 * y0 : 2 * (y0 + unit_h), 2 * x0 : 2 * (x0 + unit_w)])
            out = layer.reduce(block)
            target[..., y0 : y0 + out.shape[-2], x0 : x0 + out.shape[-1]] = out


def write_unit(array: zarr.Array) -> tuple[int, ...]:
    """The smallest region one process may write alone: the shard if sharded, else the chunk."""
    return tuple(array.shards or array.chunks)


def _quads(block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four pixels of every 2x2 block as four strided views; odd edges repeat (a copy only then)."""
    if block.shape[-2] % 2 or block.shape[-1] % 2:
        pad = [(0, 0)] * (block.ndim - 2) + [(0, block.shape[-2] % 2), (0, block.shape[-1] % 2)]
        block = np.pad(block, pad, mode="edge")
    return block[..., 0::2, 0::2], block[..., 0::2, 1::2], block[..., 1::2, 0::2], block[..., 1::2, 1::2]


def mean_2x2(block: np.ndarray) -> np.ndarray:
    """Mean of each 2x2 block, rounded half up (an odd edge averages the pixels that exist)."""
    a, b, c, d = _quads(block)
    total = a.astype(np.uint16) + b + c + d
    return ((total + 2) >> 2).astype(np.uint8)


def mean_nonzero_2x2(block: np.ndarray) -> np.ndarray:
    """Mean of the non-zero pixels of each 2x2 block, rounded half up; 0 where all four are 0.

    For the confidence: 0 means "no prediction" (glass), so it must not pull down the confidence
    of the tissue pixels it borders on a coarser level.
    """
    four = _quads(block)
    total = four[0].astype(np.uint16) + four[1] + four[2] + four[3]
    count = sum((q != 0).astype(np.uint16) for q in four)
    return np.where(count > 0, (2 * total + count) // np.maximum(2 * count, 1), 0).astype(np.uint8)


def mode_2x2(block: np.ndarray) -> np.ndarray:
    """Most frequent label of each 2x2 block; ties go to the smaller label (as scipy's mode).

    Each of the four candidates scores ``count * 256 + (255 - value)``, so the largest score is
    the most frequent value and, among equals, the smallest. Counts come from the six pairwise
    equalities of the four strided views, without stacking copies of the block.
    """
    a, b, c, d = _quads(block)
    ab, ac, ad, bc, bd, cd = (x == y for x, y in ((a, b), (a, c), (a, d), (b, c), (b, d), (c, d)))
    best, best_score = a, _score(a, ab, ac, ad)
    for value, eq in ((b, (ab, bc, bd)), (c, (ac, bc, cd)), (d, (ad, bd, cd))):
        score = _score(value, *eq)
        better = score > best_score
        best, best_score = np.where(better, value, best), np.maximum(score, best_score)
    return best


def _score(value: np.ndarray, *equal: np.ndarray) -> np.ndarray:
    """``count * 256 + (255 - value)`` of one candidate, ``count`` from its three equalities."""
    count = 1 + equal[0].astype(np.int16) + equal[1] + equal[2]
    return count * 256 + (255 - value.astype(np.int16))
