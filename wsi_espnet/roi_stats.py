"""The per-ROI table of the statistics: each annotation's area, tissue area and class fractions.

One Dask task per chunk that meets the ROI (like the rest of ``stats.py``): it rasterises the
annotations that cross the chunk and counts the labels under each. Chunks that were never
written (glass inside the ROI) are counted without reading: their labels are background.
Overlapping annotations are each counted in full, so their areas may add up to more than the
ROI's; ``roi_area_mm2`` is the area of their union, the same pixels the labels were masked with.
Areas are pixel counts (pixel centres inside, as the label mask), so tissue never exceeds area.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import dask
import numpy as np
import zarr

from wsi_espnet.classes import BACKGROUND
from wsi_espnet.grid import Chunk
from wsi_espnet.roi_regions import RoiRegions
from wsi_espnet.store import SlideStore

N_VALUES = 256
UNION = -1  # key of the union of all annotations in a chunk's counts
CSV_COLUMNS = ("index", "name", "class", "area_mm2", "tissue_area_mm2", "tissue_fraction")


def _roi_chunk(labels: zarr.Array, roi: RoiRegions, chunk: Chunk, written: bool) -> dict[int, np.ndarray]:
    """Label counts under each annotation (and their union) in one chunk (one Dask task)."""
    y0, x0, h, w = chunk.y0, chunk.x0, chunk.h, chunk.w
    masks = roi.masks(y0, x0, h, w)
    if not masks:
        return {}
    block = np.asarray(labels[y0 : y0 + h, x0 : x0 + w]) if written else np.zeros((h, w), np.uint8)
    counts = {index: np.bincount(block[inside], minlength=N_VALUES) for index, inside in masks.items()}
    counts[UNION] = np.bincount(block[roi.mask(y0, x0, h, w)], minlength=N_VALUES)
    return counts


def roi_table(
    store: SlideStore, roi: RoiRegions, written: Iterable[tuple[int, int]] | None, scheduler: Any
) -> tuple[list[dict[str, Any]], float]:
    """(one row per annotation, area of the ROI in mm²) of the slide in ``store``."""
    done = None if written is None else set(written)
    labels, mpp = store.labels(0), store.mpp
    roi_node = dask.delayed(roi, pure=True)
    tasks = [
        dask.delayed(_roi_chunk, pure=True)(labels, roi_node, chunk, done is None or chunk.index in done)
        for chunk in roi.chunks(store.grid)
    ]
    totals: dict[int, np.ndarray] = {}
    for part in dask.compute(*tasks, scheduler=scheduler):
        for index, counts in part.items():
            totals[index] = totals.get(index, 0) + counts
    px_mm2 = mpp**2 / 1e6
    rows = []
    for index, annotation in enumerate(roi.annotations):
        counts = totals.get(index, np.zeros(N_VALUES, np.int64))
        pixels = int(counts.sum())
        tissue = pixels - int(counts[BACKGROUND])
        fractions = {c.name: (int(counts[c.value]) / tissue if tissue else 0.0) for c in store.tissue_classes}
        rows.append(
            {
                "index": index + 1,
                "name": annotation.name,
                "class": annotation.classification,
                "pixels": pixels,
                "area_mm2": pixels * px_mm2,
                "tissue_area_mm2": tissue * px_mm2,
                "tissue_fraction": tissue / pixels if pixels else 0.0,
                "class_fractions": fractions,
            }
        )
    union = totals.get(UNION, np.zeros(N_VALUES, np.int64))
    return rows, int(union.sum()) * px_mm2


def write_roi_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """``<stem>.roi.csv``: one row per annotation, a ``fraction <class>`` column per class (of tissue)."""
    classes = list(dict.fromkeys(name for row in rows for name in row["class_fractions"]))
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([*CSV_COLUMNS, *(f"fraction {name}" for name in classes)])
        for row in rows:
            fixed = [(row["class"] or "") if key == "class" else row[key] for key in CSV_COLUMNS]
            writer.writerow([*fixed, *(row["class_fractions"].get(name, 0.0) for name in classes)])
    return path
