"""Small slide stores for the exporter tests, written with zarr in the layout the exporters read.

Built here rather than with ``store.py`` on purpose: the exporters read the store by its
documented layout, so these tests pin that layout independently of the writer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import zarr
from scipy import ndimage

CLASSES = [
    {"value": 0, "name": "background", "color": [255, 255, 255]},
    {"value": 1, "name": "benign_epithelium", "color": [0, 160, 0]},
    {"value": 2, "name": "malignant_epithelium", "color": [220, 0, 0]},
    {"value": 3, "name": "normal_stroma", "color": [240, 150, 200]},
    {"value": 4, "name": "desmoplastic_stroma", "color": [140, 60, 200]},
]


def blob_labels(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Tissue-like label map: smooth blobs of classes 1-3 with holes, on background 0."""
    rng = np.random.default_rng(seed)
    tissue = ndimage.gaussian_filter(rng.normal(size=shape), 10)
    kind = ndimage.gaussian_filter(rng.normal(size=shape), 16)
    labels = np.zeros(shape, np.uint8)
    labels[tissue > 0.005] = 3
    labels[(tissue > 0.005) & (kind > 0.01)] = 2
    labels[(tissue > 0.005) & (kind < -0.02)] = 1
    return labels


def write_store(
    directory: Path,
    labels: np.ndarray,
    *,
    stem: str = "slide",
    mpp: float = 2.0,
    slide_mpp: float = 0.5,
    tile: int = 128,
    n_levels: int = 3,
    zarr_format: int = 2,
    bounds_offset: tuple[int, int] = (0, 0),
    classes: list[dict] | None = None,
    stats: bool = True,
    run: bool = True,
) -> Path:
    """Write ``<directory>/<stem>.ome.zarr`` (+ stats.json, run.json) and return the store path."""
    classes = CLASSES if classes is None else classes
    height, width = labels.shape
    scale = mpp / slide_mpp
    store = directory / f"{stem}.ome.zarr"
    root = zarr.open_group(store, mode="w", zarr_format=zarr_format)
    root.attrs["wsi_espnet"] = {
        "model": {"name": "test-model", "sha256": "0" * 64},
        "classes": classes,
        "mpp": mpp,
        "tile": tile,
        "halo": 16,
        "slide": {
            "path": str(directory / f"{stem}.svs"),
            "mpp": slide_mpp,
            "dimensions": [int(width * scale), int(height * scale)],
            "bounds_offset": list(bounds_offset),
        },
        "status": "complete",
    }
    onehot = np.stack([(labels == c["value"]).astype(np.uint8) * 255 for c in classes])
    for level in range(n_levels):
        step = 2**level
        level_labels = labels[::step, ::step]
        root.create_array(f"labels/tissue/{level}", data=level_labels, chunks=(tile, tile))
        root.create_array(str(level), data=onehot[:, ::step, ::step], chunks=(len(classes), tile, tile))
    if stats:
        write_stats(directory, stem, labels, mpp, classes)
    if run:
        run_json = {
            "version": "0.1.0",
            "model": "test-model",
            "mpp": mpp,
            "tile": tile,
            "note": "<b>escaped</b>",
        }
        (directory / "run.json").write_text(json.dumps(run_json))
    return store


def write_stats(directory: Path, stem: str, labels: np.ndarray, mpp: float, classes: list[dict]) -> dict:
    """``<stem>.stats.json`` with the keys stats.py writes, computed from ``labels``."""
    px_mm2 = (mpp / 1000) ** 2
    tissue_px = int((labels != 0).sum())
    rows = []
    for c in classes[1:]:
        pixels = int((labels == c["value"]).sum())
        regions = int(ndimage.label(labels == c["value"])[1])
        rows.append(
            {
                "label": c["value"],
                "name": c["name"],
                "pixels": pixels,
                "area_mm2": pixels * px_mm2,
                "fraction_of_tissue": pixels / tissue_px if tissue_px else 0.0,
                "regions": regions,
                "largest_region_mm2": 0.0,
            }
        )
    stats = {"tissue_area_mm2": tissue_px * px_mm2, "classes": rows}
    (directory / f"{stem}.stats.json").write_text(json.dumps(stats))
    return stats
