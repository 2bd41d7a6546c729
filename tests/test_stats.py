"""Chunk-wise statistics must equal numpy/skimage on the whole array, regions merged across chunks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from skimage import measure

from wsi_espnet.grid import TileGrid
from wsi_espnet.stats import (
    StatisticsOptions,
    chunk_partials,
    compute_statistics,
    from_partials,
    write_statistics,
)
from wsi_espnet.store import SlideStore
from wsi_espnet.tissue import TissueMask

CLASSES = [
    {"value": 0, "name": "background", "color": [255, 255, 255]},
    {"value": 1, "name": "epithelium", "color": [0, 160, 0]},
    {"value": 2, "name": "stroma", "color": [245, 190, 110]},
    {"value": 3, "name": "blood", "color": [170, 30, 90]},
]
SHAPE = (150, 170)  # 5 x 6 chunks of 32, ragged at the bottom and right
TILE = 32
GRID = TileGrid(SHAPE, TILE, 0)
MPP = 2.0
TISSUE_MPP = 8.0  # the tissue mask is 4x coarser than the label map
SCALE = 4.0  # level-0 pixels per analysis pixel (slide at 0.5 µm/px)
THRESHOLD = 0.5  # low-confidence threshold of the tests


def _confidence(labels: np.ndarray) -> np.ndarray:
    """A smooth confidence map in 1..255 (0 on background, as the pipeline writes it)."""
    rng = np.random.default_rng(int(labels.sum()))
    smooth = ndimage.gaussian_filter(rng.random(SHAPE), sigma=4)
    values = np.clip(np.round((smooth - smooth.min()) / np.ptp(smooth) * 254) + 1, 1, 255).astype(np.uint8)
    return np.where(labels != 0, values, 0).astype(np.uint8)


def _random_labels(seed: int) -> np.ndarray:
    """Blobby classes (smoothed noise) so that many regions straddle chunk borders."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(4, *SHAPE)), sigma=(0, 3, 3))
    labels = noise.argmax(axis=0).astype(np.uint8)
    labels[noise.max(axis=0) < 0.05] = 0
    # A square of class 3 over the corner where chunks (1,1), (1,2), (2,1), (2,2) meet...
    labels[56:72, 56:72] = 3
    labels[52:76, 52:56] = 0
    labels[52:76, 72:76] = 0
    labels[52:56, 52:76] = 0
    labels[72:76, 52:76] = 0
    # ...and two pixels of class 1 touching only diagonally across another chunk corner.
    labels[94:98, 94:98] = 0
    labels[95, 95] = labels[96, 96] = 1
    return labels


def _tissue() -> TissueMask:
    h, w = -(-SHAPE[0] // 4), -(-SHAPE[1] // 4)
    mask = np.zeros((h, w), dtype=bool)
    mask[2:15, 3:20] = True
    mask[20:35, 25:40] = True
    mask[30:36, 5:9] = True
    return TissueMask(mask, measure.label(mask).astype(np.int32), TISSUE_MPP)


def _store(tmp_path: Path, labels: np.ndarray) -> SlideStore:
    slide = {"mpp": MPP / SCALE, "dimensions": [SHAPE[1] * 4 - 3, SHAPE[0] * 4 - 2]}
    store = SlideStore.create(tmp_path / "s.ome.zarr", GRID, MPP, CLASSES, attrs={"slide": slide})
    for iy in range(-(-SHAPE[0] // TILE)):
        for ix in range(-(-SHAPE[1] // TILE)):
            block = labels[iy * TILE : (iy + 1) * TILE, ix * TILE : (ix + 1) * TILE]
            scores = np.zeros((len(CLASSES), *block.shape), dtype=np.uint8)
            confidence = _confidence(labels)[iy * TILE : (iy + 1) * TILE, ix * TILE : (ix + 1) * TILE]
            store.write_chunk((iy, ix), scores, block, confidence=confidence)
    return store


def _reference(labels: np.ndarray, tissue: TissueMask) -> dict:
    """The same statistics from the whole array in memory."""
    components = measure.label(labels, background=0, connectivity=2)
    sizes = np.bincount(components.ravel())[1:]
    comp_class = np.array([labels[components == i][0] for i in range(1, len(sizes) + 1)])
    px_area = MPP**2 / 1e6
    tissue_px = int((labels != 0).sum())
    confidence = _confidence(labels).astype(np.float64) / 255
    classes = []
    for value, name in [(c["value"], c["name"]) for c in CLASSES[1:]]:
        pixels = int((labels == value).sum())
        of_class = sizes[comp_class == value]
        classes.append(
            {
                "label": value,
                "name": name,
                "pixels": pixels,
                "area_mm2": pixels * px_area,
                "fraction_of_tissue": pixels / tissue_px,
                "regions": len(of_class),
                "largest_region_mm2": int(of_class.max()) * px_area,
                "mean_confidence": float(confidence[labels == value].mean()),
                "low_confidence_fraction": float((confidence[labels == value] < THRESHOLD).mean()),
            }
        )
    fragments = tissue.fragment_region(0, 0, *SHAPE, MPP)
    rows = []
    for fid in range(1, tissue.n_fragments + 1):
        ys, xs = np.nonzero(fragments == fid)
        inside = labels[fragments == fid]
        x0, y0 = xs.min() * 4, ys.min() * 4
        x1, y1 = min((xs.max() + 1) * 4, SHAPE[1] * 4 - 3), min((ys.max() + 1) * 4, SHAPE[0] * 4 - 2)
        rows.append(
            {
                "fragment": fid,
                "bbox_level0": {"x": int(x0), "y": int(y0), "width": int(x1 - x0), "height": int(y1 - y0)},
                "pixels": len(inside),
                "area_mm2": len(inside) * px_area,
                "tissue_area_mm2": int((inside != 0).sum()) * px_area,
                "class_fractions": {
                    c["name"]: float((inside == c["value"]).sum() / (inside != 0).sum()) for c in CLASSES[1:]
                },
            }
        )
    return {
        "tissue_pixels": tissue_px,
        "tissue_area_mm2": tissue_px * px_area,
        "classes": classes,
        "fragments": rows,
        "uncertain_fraction_of_tissue": float(((confidence < THRESHOLD) & (labels != 0)).sum() / tissue_px),
        "low_confidence_threshold": THRESHOLD,
    }


def _assert_close(actual: object, expected: object) -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected)
        for key in expected:
            _assert_close(actual[key], expected[key])
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            _assert_close(a, e)
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-12)
    else:
        assert actual == expected


@pytest.mark.parametrize("seed", [0, 1])
def test_statistics_equal_whole_array_reference(tmp_path: Path, seed: int) -> None:
    labels, tissue = _random_labels(seed), _tissue()
    stats = compute_statistics(
        _store(tmp_path, labels), tissue, SCALE, options=StatisticsOptions(low_confidence=THRESHOLD)
    )
    expected = _reference(labels, tissue)
    for key, value in expected.items():
        _assert_close(stats[key], value)
    assert stats["tissue_pixels"] == sum(c["pixels"] for c in stats["classes"])
    assert stats["connectivity"] == 8 and stats["mpp"] == MPP
    assert len(stats["fragments"]) == 3
    # The class-3 square over a four-chunk corner is one region of at least its 16 x 16 pixels.
    blood = next(c for c in stats["classes"] if c["name"] == "blood")
    assert blood["largest_region_mm2"] >= 256 * MPP**2 / 1e6


def test_region_across_four_chunks_and_diagonal_corner_counted_once(tmp_path: Path) -> None:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[20:50, 20:50] = 2  # spans chunks (0,0), (0,1), (1,0), (1,1)
    labels[63, 63] = labels[64, 64] = 1  # diagonal neighbours in chunks (1,1) and (2,2)
    labels[95, 96] = labels[96, 95] = 1  # anti-diagonal neighbours in chunks (2,3) and (3,2)
    labels[10, 100] = 3
    labels[10, 102] = 3  # two separate pixels: not 8-connected
    stats = compute_statistics(_store(tmp_path, labels), _tissue(), SCALE)
    by_name = {c["name"]: c for c in stats["classes"]}
    assert by_name["stroma"]["regions"] == 1
    assert by_name["stroma"]["pixels"] == 900
    assert by_name["stroma"]["area_mm2"] == pytest.approx(900 * MPP**2 / 1e6)
    assert by_name["stroma"]["largest_region_mm2"] == pytest.approx(900 * MPP**2 / 1e6)
    assert by_name["epithelium"]["regions"] == 2
    assert by_name["blood"]["regions"] == 2
    assert stats["tissue_area_mm2"] == pytest.approx(906 * MPP**2 / 1e6)


def test_partials_of_chunk_groups_give_the_statistics_of_all_chunks(tmp_path: Path) -> None:
    """``segment`` computes each infer task's partials as it ends: regions that cross from one
    group's chunks into another's are still merged, and every figure is the same."""
    labels, tissue = _random_labels(4), _tissue()
    labels[20:50, 20:50] = 2  # one region over four chunks, split between the groups below
    store = _store(tmp_path, labels)
    indices = [chunk.index for chunk in store.grid.chunks]
    groups = [indices[0::3], indices[1::3], indices[2::3]]
    parts = [part for group in groups for part in chunk_partials(store, tissue, group)]
    assert from_partials(store, parts, SCALE) == compute_statistics(store, tissue, SCALE)


def test_all_background_gives_zero_areas(tmp_path: Path) -> None:
    store = SlideStore.create(tmp_path / "s.ome.zarr", GRID, MPP, CLASSES)  # nothing written
    stats = compute_statistics(store, _tissue(), SCALE)
    assert stats["tissue_area_mm2"] == 0.0 and stats["tissue_pixels"] == 0
    for row in stats["classes"]:
        assert row["pixels"] == row["regions"] == 0
        assert row["area_mm2"] == row["fraction_of_tissue"] == row["largest_region_mm2"] == 0.0
        assert row["mean_confidence"] is None and row["low_confidence_fraction"] == 0.0
    assert stats["uncertain_fraction_of_tissue"] == 0.0
    assert all(f["tissue_area_mm2"] == 0.0 and f["area_mm2"] > 0 for f in stats["fragments"])


def test_distributed_client_gives_the_same_result(tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    labels, tissue = _random_labels(3), _tissue()
    store = _store(tmp_path, labels)
    local = compute_statistics(store, tissue, SCALE)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        assert compute_statistics(store, tissue, SCALE, client=client) == local


def test_write_statistics_json_and_csv(tmp_path: Path) -> None:
    labels = _random_labels(0)
    stats = compute_statistics(_store(tmp_path, labels), _tissue(), SCALE)
    write_statistics(stats, tmp_path / "s.stats.json", tmp_path / "s.stats.csv")
    assert json.loads((tmp_path / "s.stats.json").read_text()) == stats
    with (tmp_path / "s.stats.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == [
        "label",
        "name",
        "pixels",
        "area_mm2",
        "fraction_of_tissue",
        "regions",
        "largest_region_mm2",
        "mean_confidence",
        "low_confidence_fraction",
        "uncertain_fraction_of_tissue",
        "low_confidence_threshold",
    ]
    assert float(rows[0]["mean_confidence"]) == pytest.approx(stats["classes"][0]["mean_confidence"])
    assert {r["uncertain_fraction_of_tissue"] for r in rows} == {str(stats["uncertain_fraction_of_tissue"])}
    assert [r["name"] for r in rows] == ["epithelium", "stroma", "blood"]
    assert sum(int(r["pixels"]) for r in rows) == stats["tissue_pixels"]
    assert float(rows[0]["area_mm2"]) == pytest.approx(int(rows[0]["pixels"]) * MPP**2 / 1e6)
