"""Tissue statistics of one slide, computed chunk by chunk from the level-0 label map.

The whole label map of a slide does not fit in memory, so every number here is built from
per-chunk partial results (one Dask task per stored chunk) and a small reduction:

* **Tissue** is every pixel whose label is not background (class value 0), i.e. what the
  model (inside the tissue mask) called tissue. The pixels of the non-background classes
  therefore sum to the tissue pixels, and fractions are of tissue, not of glass.
* **Regions** are connected components of one class with **8-connectivity** (diagonal
  neighbours touch), counted across chunk borders: each chunk is labelled with
  ``skimage.measure.label`` and the components that touch across a shared chunk edge or corner
  are merged afterwards (see :func:`_merge_regions`). Libraries label whole in-memory arrays
  only (dask-image's ``label`` builds the same edge merge but materialises a global label array
  of the slide's size), hence this small hand-written merge with memory bounded by the number
  of components and chunk edges.
* **Fragments** are the separate pieces of the tissue mask (``TissueMask.fragments``), resampled
  to every chunk; each gets its bounding box in level-0 pixels, area and class fractions.

Areas: ``pixels * mpp**2 / 1e6`` mm², with ``mpp`` the analysis resolution of the store.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
import zarr
from scipy import ndimage, sparse
from scipy.sparse import csgraph
from skimage import measure

from wsi_espnet import confidence as conf
from wsi_espnet.classes import BACKGROUND, ClassInfo
from wsi_espnet.grid import Chunk
from wsi_espnet.qc_stats import artifact_statistics
from wsi_espnet.roi_regions import RoiRegions
from wsi_espnet.roi_stats import roi_table
from wsi_espnet.store import SlideStore
from wsi_espnet.tissue import TissueMask

CONNECTIVITY = 8
N_VALUES = 256  # uint8 labels
CSV_COLUMNS = ("label", "name", "pixels", "area_mm2", "fraction_of_tissue", "regions", "largest_region_mm2")
# Confidence columns; the last two are the slide's (the same on every row).
CONFIDENCE_COLUMNS = (
    "mean_confidence",
    "low_confidence_fraction",
    "uncertain_fraction_of_tissue",
    "low_confidence_threshold",
)
TISSUE_DEFINITION = "pixels whose label is not background (class value 0)"


@dataclass
class _ChunkPartial:
    """What one chunk contributes; everything but the components is O(chunk edge)."""

    index: tuple[int, int]
    counts: np.ndarray  # (256,) pixels per label value
    sizes: np.ndarray  # (n,) pixels of component 1..n
    classes: np.ndarray  # (n,) label value of component 1..n
    top: np.ndarray  # component ids (0 = background) along the four edges
    bottom: np.ndarray
    left: np.ndarray
    right: np.ndarray
    fragment_counts: np.ndarray  # (F + 1, 256) pixels per fragment id and label value
    fragment_boxes: dict[int, tuple[int, int, int, int]]  # id -> (y0, x0, y1, x1) analysis px
    confidence: conf.ConfidencePartial | None = None  # None: the store has no confidence layer


@dataclass(frozen=True)
class StatisticsOptions:
    """What a run adds to the statistics: its ``--roi`` and its ``--low-confidence`` threshold."""

    roi: RoiRegions | None = None
    low_confidence: float = conf.DEFAULT_LOW_CONFIDENCE


@dataclass(frozen=True)
class _Layers:
    """The optional inputs one chunk's task reads besides its labels (each None when absent)."""

    roi: RoiRegions | None = None
    confidence: conf.ConfidenceSource | None = None


def _chunk_partial(
    labels: zarr.Array, tissue: TissueMask, mpp: float, chunk: Chunk, layers: _Layers = _Layers()
) -> _ChunkPartial:
    """Count, label and measure one stored chunk (runs as one Dask task); fragments only inside the ROI."""
    roi, confidence = layers.roi, layers.confidence
    y0, x0, h, w = chunk.y0, chunk.x0, chunk.h, chunk.w
    block = np.asarray(labels[y0 : y0 + h, x0 : x0 + w])
    components = measure.label(block, background=BACKGROUND, connectivity=2)
    n = int(components.max())
    sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
    classes = np.zeros(n + 1, dtype=np.uint8)
    classes[components.ravel()] = block.ravel()  # every pixel of a component has its class

    n_fragments = tissue.n_fragments
    fragments = tissue.fragment_region(y0, x0, h, w, mpp)
    if roi is not None:  # --roi: a fragment is measured inside the ROI only, like its labels
        fragments = np.where(roi.mask(y0, x0, h, w), fragments, 0)
    keys = fragments.astype(np.int64).ravel() * N_VALUES + block.ravel()
    fragment_counts = np.bincount(keys, minlength=(n_fragments + 1) * N_VALUES).reshape(-1, N_VALUES)
    boxes = {
        fid: (y0 + s[0].start, x0 + s[1].start, y0 + s[0].stop, x0 + s[1].stop)
        for fid, s in enumerate(ndimage.find_objects(fragments), start=1)
        if s is not None
    }
    return _ChunkPartial(
        index=chunk.index,
        counts=np.bincount(block.ravel(), minlength=N_VALUES),
        sizes=sizes,
        classes=classes[1:],
        top=components[0].copy(),
        bottom=components[-1].copy(),
        left=components[:, 0].copy(),
        right=components[:, -1].copy(),
        fragment_counts=fragment_counts[: n_fragments + 1],
        fragment_boxes=boxes,
        confidence=conf.chunk_partial(confidence, block, y0, x0) if confidence is not None else None,
    )


def _touching(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Component-id pairs facing each other across an edge (8-connected: offsets -1, 0, +1)."""
    pairs_a, pairs_b = [], []
    n = len(a)
    for shift in (-1, 0, 1):
        i = np.arange(max(0, -shift), min(n, n - shift))
        pairs_a.append(a[i])
        pairs_b.append(b[i + shift])
    return np.concatenate(pairs_a), np.concatenate(pairs_b)


def _merge_regions(parts: dict[tuple[int, int], _ChunkPartial]) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-chunk components across chunk borders → (size, class) of every region.

    Components get global ids (chunk offset + local id). Two components are the same region
    when they have the same class and touch across a shared edge (pixel pairs offset by
    -1/0/+1 along it) or a shared corner (the diagonal pixel pair where four chunks meet).
    The equivalences form a sparse graph whose connected components (scipy's csgraph, which
    resolves the union-find for us) are the regions.
    """
    order = sorted(parts)
    offsets, total = {}, 0
    for key in order:
        offsets[key] = total
        total += len(parts[key].sizes)
    if total == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint8)
    sizes = np.concatenate([parts[k].sizes for k in order])
    classes = np.concatenate([parts[k].classes for k in order])

    def global_ids(key: tuple[int, int], local: np.ndarray) -> np.ndarray:
        return np.where(local > 0, local.astype(np.int64) + offsets[key] - 1, -1)

    us, vs = [], []
    for (iy, ix), part in parts.items():
        neighbours = []
        if (iy, ix + 1) in parts:
            neighbours.append(((iy, ix + 1), *_touching(part.right, parts[iy, ix + 1].left)))
        if (iy + 1, ix) in parts:
            neighbours.append(((iy + 1, ix), *_touching(part.bottom, parts[iy + 1, ix].top)))
        if (iy + 1, ix + 1) in parts:
            corner = parts[iy + 1, ix + 1]
            neighbours.append(((iy + 1, ix + 1), part.bottom[-1:], corner.top[:1]))
        if (iy + 1, ix - 1) in parts:
            corner = parts[iy + 1, ix - 1]
            neighbours.append(((iy + 1, ix - 1), part.bottom[:1], corner.top[-1:]))
        for other, a, b in neighbours:
            u, v = global_ids((iy, ix), a), global_ids(other, b)
            keep = (u >= 0) & (v >= 0)
            u, v = u[keep], v[keep]
            same = classes[u] == classes[v]
            us.append(u[same])
            vs.append(v[same])
    u = np.concatenate([np.zeros(0, np.int64), *us])
    v = np.concatenate([np.zeros(0, np.int64), *vs])
    graph = sparse.coo_matrix((np.ones(len(u), dtype=np.int8), (u, v)), shape=(total, total))
    n_regions, region_of = csgraph.connected_components(graph, directed=False)
    region_sizes = np.bincount(region_of, weights=sizes, minlength=n_regions).astype(np.int64)
    region_classes = np.zeros(n_regions, dtype=np.uint8)
    region_classes[region_of] = classes
    return region_sizes, region_classes


def _level0_box(
    box: tuple[int, int, int, int], scale: float, limits: tuple[int, int] | None
) -> dict[str, int]:
    """Analysis-pixel box (y0, x0, y1, x1) → level-0 {x, y, width, height}, outward-rounded."""
    y0, x0, y1, x1 = box
    left, top = math.floor(x0 * scale), math.floor(y0 * scale)
    right, bottom = math.ceil(x1 * scale), math.ceil(y1 * scale)
    if limits is not None:
        right, bottom = min(right, limits[0]), min(bottom, limits[1])
    return {"x": left, "y": top, "width": right - left, "height": bottom - top}


def _fragment_table(
    parts: list[_ChunkPartial],
    classes: tuple[ClassInfo, ...],
    mpp: float,
    scale: float,
    limits: tuple[int, int] | None,
) -> list[dict[str, Any]]:
    """One row per tissue fragment that reaches the analysis grid."""
    counts = sum(p.fragment_counts for p in parts)
    boxes: dict[int, tuple[int, int, int, int]] = {}
    for part in parts:
        for fid, (y0, x0, y1, x1) in part.fragment_boxes.items():
            old = boxes.get(fid, (y0, x0, y1, x1))
            boxes[fid] = (min(old[0], y0), min(old[1], x0), max(old[2], y1), max(old[3], x1))
    rows = []
    for fid in sorted(boxes):
        pixels = int(counts[fid].sum())
        tissue = int(counts[fid].sum() - counts[fid][BACKGROUND])
        fractions = {
            c.name: (int(counts[fid][c.value]) / tissue if tissue else 0.0)
            for c in classes
            if c.value != BACKGROUND
        }
        rows.append(
            {
                "fragment": fid,
                "bbox_level0": _level0_box(boxes[fid], scale, limits),
                "pixels": pixels,
                "area_mm2": pixels * mpp**2 / 1e6,
                "tissue_area_mm2": tissue * mpp**2 / 1e6,
                "class_fractions": fractions,
            }
        )
    return rows


def compute_statistics(
    store: SlideStore,
    tissue: TissueMask,
    level0_scale: float,
    written: Iterable[tuple[int, int]] | None = None,
    client: Any = None,
    options: StatisticsOptions = StatisticsOptions(),
) -> dict[str, Any]:
    """Tissue area, per-class pixels/areas/regions and a per-fragment table of one slide.

    ``level0_scale`` is level-0 pixels per analysis pixel (``store.mpp / slide.mpp``); it only
    converts fragment boxes to the slide's own pixels. Each stored chunk is one Dask task
    (``client`` when given, else local threads); only per-chunk partials reach this process.
    Only ``written`` chunks are visited (all when None): an unwritten chunk is background.
    With ``options.roi`` (``--roi``) the labels already cover only the ROI; the result gains the
    per-ROI table ``roi`` and ``roi_area_mm2`` (:mod:`wsi_espnet.roi_stats`).
    ``options.low_confidence`` is the threshold of the confidence statistics
    (:mod:`wsi_espnet.confidence`). This is :func:`chunk_partials` then
    :func:`from_partials`; ``segment`` runs the two apart, the partials as blocks finish.
    """
    indices = [c.index for c in store.grid.chunks] if written is None else sorted(written)
    parts = chunk_partials(store, tissue, indices, options, client)
    return from_partials(store, parts, level0_scale, options, client)


def chunk_partials(
    store: SlideStore,
    tissue: TissueMask,
    indices: Iterable[tuple[int, int]],
    options: StatisticsOptions = StatisticsOptions(),
    client: Any = None,
) -> list[_ChunkPartial]:
    """What each chunk of ``indices`` contributes (one Dask task each: ``client`` or local threads).

    Partials of disjoint chunk sets can be computed apart and their lists joined.
    """
    mpp, labels = store.mpp, store.labels(0)
    tissue_node = dask.delayed(tissue, pure=True)
    array = store.confidence(0)
    source = conf.ConfidenceSource(array, options.low_confidence) if array is not None else None
    layers = dask.delayed(_Layers(options.roi, source), pure=True)
    chunks = [store.grid.chunk(index) for index in indices]
    tasks = [dask.delayed(_chunk_partial, pure=True)(labels, tissue_node, mpp, c, layers) for c in chunks]
    return list(dask.compute(*tasks, scheduler=client if client is not None else "threads"))


def from_partials(
    store: SlideStore,
    parts: list[_ChunkPartial],
    level0_scale: float,
    options: StatisticsOptions = StatisticsOptions(),
    client: Any = None,
) -> dict[str, Any]:
    """The statistics of the chunks whose partials are ``parts`` (every written chunk once); the
    artifact and ROI tables are read here, from the same chunks."""
    mpp, roi = store.mpp, options.roi
    chunks = [store.grid.chunk(index) for index in sorted(p.index for p in parts)]
    counts = sum((p.counts for p in parts), np.zeros(N_VALUES, np.int64))
    region_sizes, region_classes = _merge_regions({p.index: p for p in parts})
    tissue_pixels = int(counts.sum() - counts[BACKGROUND])
    rows = []
    for cls in store.tissue_classes:
        value = cls.value
        pixels = int(counts[value])
        of_class = region_sizes[region_classes == value]
        rows.append(
            {
                "label": value,
                "name": cls.name,
                "pixels": pixels,
                "area_mm2": pixels * mpp**2 / 1e6,
                "fraction_of_tissue": pixels / tissue_pixels if tissue_pixels else 0.0,
                "regions": len(of_class),
                "largest_region_mm2": (int(of_class.max()) if len(of_class) else 0) * mpp**2 / 1e6,
            }
        )
    confidence = [p.confidence for p in parts]
    confidence_keys = conf.add_statistics(rows, counts, confidence, options.low_confidence)
    dims = store.attrs.get("slide", {}).get("dimensions")
    limits = (int(dims[0]), int(dims[1])) if dims else None
    result = {
        "mpp": mpp,
        "level0_scale": float(level0_scale),
        "tissue_definition": TISSUE_DEFINITION,
        "connectivity": CONNECTIVITY,
        "tissue_pixels": tissue_pixels,
        "tissue_area_mm2": tissue_pixels * mpp**2 / 1e6,
        "classes": rows,
        "fragments": _fragment_table(parts, store.classes, mpp, level0_scale, limits),
        **confidence_keys,
        **artifact_statistics(store, chunks, tissue_pixels, client),
    }
    if roi is not None:
        scheduler = client if client is not None else "threads"
        result["roi"], result["roi_area_mm2"] = roi_table(store, roi, [c.index for c in chunks], scheduler)
    return result


def write_statistics(stats: dict[str, Any], json_path: str | Path, csv_path: str | Path) -> None:
    """Everything as JSON; one CSV row per (non-background) class for spreadsheets."""
    Path(json_path).write_text(json.dumps(stats, indent=2) + "\n")
    with Path(csv_path).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS + CONFIDENCE_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        slide_wide = {key: stats.get(key) for key in CONFIDENCE_COLUMNS[2:]}
        writer.writerows({**slide_wide, **row} for row in stats["classes"])
