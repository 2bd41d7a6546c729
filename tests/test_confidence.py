"""The confidence layer end to end: predictor → store (NGFF, pyramid) → statistics → GeoJSON → overlay.

Real data throughout: a Y-Net H&E ROI through the shipped network for the definition, and a
``segment`` run (real Dask, real Zarr) on CMU-1-Small-Region for everything downstream, checked
against direct computations over the arrays it stored.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch
import zarr
from PIL import Image
from shapely.geometry import shape

from wsi_espnet.confidence import DEFAULT_LOW_CONFIDENCE
from wsi_espnet.config import OutputSettings, load_settings
from wsi_espnet.export import export_all
from wsi_espnet.export.geojson import Frame, write_geojson
from wsi_espnet.export.uncertain import UNCERTAIN
from wsi_espnet.grid import TileGrid
from wsi_espnet.models.cards import load_card
from wsi_espnet.pipeline import run_segment
from wsi_espnet.predict import Predictor
from wsi_espnet.runstate import SlideJob
from wsi_espnet.stats import compute_statistics
from wsi_espnet.store import SlideStore
from wsi_espnet.tissue import TissueMask

CMU = "wsi_aperio_cmu1_small_region/CMU-1-Small-Region.svs"
ROI = "ynet_breast_biopsy/images/2204_1_18400_11800_1.33.png"
THRESHOLD = 0.6  # not the default, so the test sees the option travel
MIN_AREA_UM2 = 200.0


def _mean_2x2(a: np.ndarray) -> np.ndarray:
    """Reference 2x2 mean of the non-zero pixels (0 = no prediction), rounded half up, odd edges
    repeating their last row/column; 0 where a block has no prediction."""
    even = np.pad(a, [(0, a.shape[0] % 2), (0, a.shape[1] % 2)], mode="edge").astype(np.float64)
    four = np.stack([even[0::2, 0::2], even[0::2, 1::2], even[1::2, 0::2], even[1::2, 1::2]])
    count = (four > 0).sum(axis=0)
    mean = np.divide(four.sum(axis=0), count, out=np.zeros(count.shape), where=count > 0)
    return np.floor(mean + 0.5).astype(np.uint8)


# --- the definition ---------------------------------------------------------------------------


def test_confidence_is_the_max_softmax_on_a_real_image(shared_data, tissue_card) -> None:
    card = load_card(str(tissue_card))
    image = np.asarray(Image.open(shared_data / ROI).convert("RGB"))[:256, :320]
    predictor = Predictor(card, "cpu")
    with torch.inference_mode():
        x = card.normalisation.apply(torch.from_numpy(image[None].copy()))
        logits = card.build_model().eval()(x)[..., 16:-16, 16:-16].float()
    probs = torch.softmax(logits, 1)[0].numpy()
    plain = predictor.predict(image[None], 16)
    expected = np.round(probs.max(0) * 255)
    assert np.abs(plain.confidence[0].astype(int) - expected).max() <= 1
    assert np.mean(plain.confidence[0] == expected) > 0.99
    assert np.array_equal(plain.confidence[0], plain.scores[0].max(0))  # the label's own score
    # Tissue-only labels: the chosen class's probability among the tissue classes.
    tissue = predictor.predict(image[None], 16, tissue_only=True)
    among = probs[1:] / probs[1:].sum(0)
    assert np.abs(tissue.confidence[0].astype(int) - np.round(among.max(0) * 255)).max() <= 1
    assert np.array_equal(tissue.labels[0], among.argmax(0) + 1)
    assert tissue.confidence.min() >= np.floor(255 / (card.n_classes - 1))  # never "no prediction"


# --- the store layer --------------------------------------------------------------------------


@pytest.mark.parametrize("zarr_format", [2, 3], ids=["ngff04", "ngff05"])
def test_store_confidence_layer_validates_and_reads_back(tmp_path: Path, zarr_format: int) -> None:
    classes = [
        {"value": 0, "name": "background", "color": [255, 255, 255]},
        {"value": 1, "name": "stroma", "color": [245, 190, 110]},
    ]
    grid = TileGrid((700, 1100), 128, 0)
    store = SlideStore.create(tmp_path / "s.ome.zarr", grid, 0.5, classes, zarr_format=zarr_format)
    rng = np.random.default_rng(zarr_format)
    written, expected = [(0, 0), (2, 3), (5, 8)], np.zeros(grid.shape, np.uint8)
    for index in written:
        c = grid.chunk(index)
        confidence = rng.integers(1, 256, (c.h, c.w), dtype=np.uint8)
        labels = np.ones((c.h, c.w), np.uint8)
        store.write_chunk(index, np.zeros((2, c.h, c.w), np.uint8), labels, confidence=confidence)
        expected[c.y0 : c.y0 + c.h, c.x0 : c.x0 + c.w] = confidence
    store.build_pyramid(written)
    reopened = SlideStore.open(store.path, mode="r")
    assert np.array_equal(reopened.confidence(0)[:], expected)  # unwritten chunks read 0
    level = expected
    for n in range(1, reopened.n_levels):
        level = _mean_2x2(level)
        assert reopened.confidence(n).shape == reopened.labels(n).shape
        assert np.array_equal(reopened.confidence(n)[:], level)
    models = importlib.import_module("ome_zarr_models.v04" if zarr_format == 2 else "ome_zarr_models.v05")
    image = models.Image.from_zarr(zarr.open_group(store.path / "confidence", mode="r"))
    attributes = image.attributes if zarr_format == 2 else image.attributes.ome
    multiscale = attributes.multiscales[0]
    assert [a.name for a in multiscale.axes] == ["y", "x"]
    scales = [d.coordinateTransformations[0].scale for d in multiscale.datasets]
    assert scales == [[0.5 * 2**n, 0.5 * 2**n] for n in range(store.n_levels)]
    full = np.ones((128, 128), np.uint8)
    with pytest.raises(ValueError, match="confidence"):
        store.write_chunk((0, 0), np.zeros((2, 128, 128), np.uint8), full, confidence=full[:64])


# --- a real segment run -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(shared_data, tissue_card, tmp_path_factory) -> SlideStore:
    """CMU-1-Small-Region segmented with --tta 2 --low-confidence 0.6 (real Dask, real Zarr)."""
    outdir = tmp_path_factory.mktemp("conf")
    settings = load_settings(
        None,
        model=str(tissue_card),
        quiet=True,
        workers=0,
        tta=2,
        low_confidence=THRESHOLD,
        geojson_min_area_um2=MIN_AREA_UM2,
    )
    (result,) = run_segment([SlideJob(shared_data / CMU)], outdir, settings)
    assert result.status == "done", result.error
    return SlideStore.open(outdir / "CMU-1-Small-Region" / "CMU-1-Small-Region.ome.zarr", mode="r")


def test_segment_writes_a_valid_confidence_pyramid(run: SlideStore) -> None:
    from ome_zarr_models.v04 import Image as NgffImage

    NgffImage.from_zarr(zarr.open_group(run.path / "confidence", mode="r"))
    labels, confidence = run.labels(0)[:], run.confidence(0)[:]
    assert (confidence[labels == 0] == 0).all()  # glass and unwritten chunks: no prediction
    assert confidence[labels != 0].min() >= 255 // 7  # 7 tissue classes: p >= 1/7
    assert run.n_levels >= 2
    assert np.array_equal(run.confidence(1)[:], _mean_2x2(confidence))
    record = json.loads((run.directory / "run.json").read_text())
    assert record["parameters"]["tta"] == 2 and record["parameters"]["low_confidence"] == THRESHOLD
    assert record["store_params"]["tta"] == 2  # a partial store made with another --tta is not resumed


def test_statistics_match_the_stored_arrays(run: SlideStore) -> None:
    stats = json.loads(run.stats_path.read_text())
    labels, confidence = run.labels(0)[:], run.confidence(0)[:].astype(np.float64) / 255
    assert stats["low_confidence_threshold"] == THRESHOLD
    tissue = labels != 0
    low = confidence < THRESHOLD
    assert stats["uncertain_fraction_of_tissue"] == pytest.approx((low & tissue).sum() / tissue.sum())
    assert 0 < stats["uncertain_fraction_of_tissue"] < 1
    for row in stats["classes"]:
        of_class = labels == row["label"]
        assert 0.0 <= row["low_confidence_fraction"] <= 1.0
        if not of_class.any():
            assert row["mean_confidence"] is None
            continue
        assert row["mean_confidence"] == pytest.approx(confidence[of_class].mean(), rel=1e-12)
        assert row["low_confidence_fraction"] == pytest.approx(low[of_class].mean(), rel=1e-12)
    csv_head = (run.directory / f"{run.stem}.stats.csv").read_text().splitlines()[0]
    assert "mean_confidence,low_confidence_fraction,uncertain_fraction_of_tissue" in csv_head


def _uncertain_features(path: Path) -> list[dict]:
    features = json.loads(path.read_text())["features"]
    return [f for f in features if f["properties"]["classification"]["name"] == UNCERTAIN.name]


def test_uncertain_geojson_regions_are_valid_locked_and_large_enough(run: SlideStore, tmp_path: Path) -> None:
    # The run's own export: one locked, coloured feature class with an area measurement, and a
    # FeatureCollection QuPath imports (the rules of tests/qupath_rules.py).
    from qupath_rules import check_feature_collection

    collection = run.directory / f"{run.stem}.geojson"
    assert check_feature_collection(json.loads(collection.read_text())) == []
    features = _uncertain_features(collection)
    assert features
    for feature in features:
        props = feature["properties"]
        assert props["isLocked"] is True and props["classification"]["color"] == list(UNCERTAIN.color)
        assert props["measurements"]["Area µm^2"] > 0
        assert shape(feature["geometry"]).is_valid
    # One feature per region with exact pixel edges: every region is at least the minimum, and
    # regions plus dropped specks are exactly the uncertain tissue pixels of the arrays.
    frame = Frame(uncertain_below=THRESHOLD)
    path = write_geojson(run, tmp_path / "regions.geojson", True, MIN_AREA_UM2, 0.0, frame)
    regions = _uncertain_features(path)
    um2 = run.slide_mpp**2
    areas = [shape(f["geometry"]).area * um2 for f in regions]
    assert min(areas) >= MIN_AREA_UM2 - 1e-6
    summary = json.loads(path.read_text())["wsi_espnet"]
    row = next(c for c in summary["classes"] if c["name"] == UNCERTAIN.name)
    labels, confidence = run.labels(0)[:], run.confidence(0)[:]
    uncertain_mm2 = ((labels != 0) & (confidence < THRESHOLD * 255)).sum() * run.mpp**2 / 1e6
    # (geometry areas are of 0.01-px-rounded level-0 coordinates, hence the tolerance)
    assert row["area_mm2"] + row["specks_dropped_mm2"] == pytest.approx(uncertain_mm2, rel=1e-4)
    assert row["regions"] == len(regions)
    # Uncertain regions lie on tissue: each intersects the union of the class features.
    classes = [f for f in json.loads(path.read_text())["features"] if f not in regions]
    tissue = shapely.union_all([shape(f["geometry"]) for f in classes])
    assert all(shape(f["geometry"]).intersection(tissue).area > 0 for f in regions[:20])


def test_no_uncertain_leaves_the_class_out(run: SlideStore, tmp_path: Path) -> None:
    copy = tmp_path / run.stem
    shutil.copytree(run.directory, copy)
    export_all(copy, ("geojson",), OutputSettings(geojson_uncertain=False))
    assert not _uncertain_features(copy / f"{run.stem}.geojson")
    assert json.loads((copy / f"{run.stem}.geojson").read_text())["wsi_espnet"]["uncertain_below"] is None


def test_overlay_and_report_show_the_confidence_view(run: SlideStore) -> None:
    overlay = Image.open(run.directory / f"{run.stem}.overlay.png")
    labels = run.labels(0)
    # Two panels (class view, confidence view) of the thumbnail's size, then the legend.
    thumb_w = overlay.height * labels.shape[1] / labels.shape[0]
    assert overlay.width > 2 * thumb_w
    pixels = np.asarray(overlay.convert("RGB"))
    right = pixels[:, int(thumb_w) + 20 : int(2 * thumb_w)]
    assert (right == [253, 231, 37]).all(axis=-1).any()  # viridis yellow: confident tissue
    report = (run.directory / f"{run.stem}.report.html").read_text()
    assert "mean confidence" in report and "% low confidence" in report
    stats = json.loads(run.stats_path.read_text())
    assert f"Uncertain: {100 * stats['uncertain_fraction_of_tissue']:.1f} % of the tissue" in report


def test_store_without_confidence_layer_still_reads_and_exports(run: SlideStore, tmp_path: Path) -> None:
    """A store written before the layer existed: accessor None, statistics None, exports work."""
    copy = tmp_path / run.stem
    shutil.copytree(run.directory, copy)
    shutil.rmtree(copy / f"{run.stem}.ome.zarr" / "confidence")
    old = SlideStore.open(copy / f"{run.stem}.ome.zarr", mode="r")
    assert old.confidence(0) is None
    mask = np.ones((1, 1), bool)
    stats = compute_statistics(old, TissueMask(mask, mask.astype(np.int32), 1e6), old.scale)
    assert stats["uncertain_fraction_of_tissue"] is None
    assert all(r["mean_confidence"] is None for r in stats["classes"])
    assert stats["low_confidence_threshold"] == DEFAULT_LOW_CONFIDENCE
    written = export_all(copy, ("geojson", "png"))
    assert not _uncertain_features(written["geojson"][0])
    assert Image.open(written["png"][0]).width < Image.open(run.directory / f"{run.stem}.overlay.png").width


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_bad_low_confidence_is_one_error_line(small_slide, tmp_path: Path, value: str) -> None:
    from click.testing import CliRunner

    from wsi_espnet.cli import main

    args = ["segment", str(small_slide), "-o", str(tmp_path / "out"), "--low-confidence", value]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: --low-confidence must be between 0 and 1, got {float(value)}"
    ]
