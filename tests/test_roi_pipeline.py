"""``segment --roi`` end to end: fewer chunks, labels only inside, statistics, exports, resume, bounds.

Real slides through the real pipeline (in-process Dask, ``--workers 0``) into real stores; the
ROI files are QuPath-style exports written here, in QuPath's level-0 frame.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import shapely
from click.testing import CliRunner
from export_stores import write_store
from PIL import Image
from shapely.geometry import shape

from wsi_espnet.cli import main
from wsi_espnet.config import load_settings
from wsi_espnet.export import export_all
from wsi_espnet.export.confidence_view import GAP
from wsi_espnet.export.geojson import read_summary, write_geojson
from wsi_espnet.export.overlay import LEGEND_WIDTH, render_overlay
from wsi_espnet.export.roi_views import OUTLINE_COLOR
from wsi_espnet.pipeline import run_segment
from wsi_espnet.roi import read_roi, write_normalised
from wsi_espnet.runstate import SlideJob
from wsi_espnet.store import SlideStore, open_store

CMU = "wsi_aperio_cmu1_small_region/CMU-1-Small-Region.svs"
FAST = {"tile": 256, "workers": 0, "quiet": True}


def _annotation(coords, name, cls):
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [coords]},
        "properties": {
            "objectType": "annotation",
            "name": name,
            "classification": {"name": cls, "color": [9, 9, 9]},
        },
    }


def _roi_file(path: Path, *features) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": list(features)}))
    return path


TUMOR_A = [[600, 1200], [1600, 1300], [1500, 2400], [700, 2300], [600, 1200]]
TUMOR_B = [[1300, 2000], [1900, 2000], [1900, 2600], [1300, 2600], [1300, 2000]]  # overlaps A
STROMA = [[1000, 400], [1400, 400], [1400, 800], [1000, 800], [1000, 400]]  # not --roi-class Tumor


@pytest.fixture(scope="module")
def cmu_runs(shared_data, tissue_card, tmp_path_factory):
    slide = shared_data / CMU
    if not slide.is_file():
        pytest.skip(f"{slide} not found (the real Aperio slide of ../shared/data)")
    folder = tmp_path_factory.mktemp("cmu-roi")
    baseline = run_segment(
        [SlideJob(slide)], folder / "all", load_settings(None, model=str(tissue_card), formats=(), **FAST)
    )
    assert baseline[0].status == "done", baseline[0].error
    roi = _roi_file(
        folder / "drawn.geojson",
        _annotation(TUMOR_A, "Tumor A", "Tumor"),
        _annotation(TUMOR_B, "Tumor B", "Tumor"),
        _annotation(STROMA, "Stroma", "Stroma"),
    )
    args = [
        "segment",
        slide,
        "-o",
        folder / "roi",
        "--model",
        tissue_card,
        "--roi",
        roi,
        "--roi-class",
        "Tumor",
    ]
    result = CliRunner().invoke(main, [str(a) for a in [*args, "--tile", "256", "--workers", "0", "-q"]])
    assert result.exit_code == 0, result.stderr
    return folder, roi


def _run_json(folder: Path) -> dict:
    return json.loads(next(folder.glob("*/run.json")).read_text())


def test_only_chunks_inside_the_roi_are_inferred(cmu_runs):
    folder, _ = cmu_runs
    full, roi = _run_json(folder / "all")["tiles"], _run_json(folder / "roi")["tiles"]
    assert 0 < roi["processed"] < full["processed"]
    blocks = _run_json(folder / "all")["inference"], _run_json(folder / "roi")["inference"]
    assert (
        blocks[1]["input_pixels"] < blocks[0]["input_pixels"] and blocks[1]["blocks"] <= blocks[0]["blocks"]
    )
    assert roi["tissue"] + roi["outside_roi"] == full["tissue"]
    assert roi["processed"] + roi["skipped_background"] + roi["outside_roi"] == roi["total"]


def test_labels_outside_the_roi_are_background_and_stats_cover_it(cmu_runs):
    folder, _ = cmu_runs
    out = folder / "roi" / "CMU-1-Small-Region"
    store = open_store(out)
    roi = read_roi(out / "CMU-1-Small-Region.roi.geojson")
    assert [a.name for a in roi.annotations] == ["Tumor A", "Tumor B"]  # Stroma filtered out
    regions = roi.in_analysis(store.bounds_offset, store.scale, store.shape)
    inside = regions.mask(0, 0, *store.shape)
    labels = store.labels(0)[:]
    assert not labels[~inside].any() and labels[inside].any()
    stats = json.loads((out / "CMU-1-Small-Region.stats.json").read_text())
    px_mm2 = store.mpp**2 / 1e6
    assert stats["roi_area_mm2"] == pytest.approx(inside.sum() * px_mm2)
    assert stats["tissue_area_mm2"] == pytest.approx((labels != 0).sum() * px_mm2)
    assert 0 < stats["tissue_area_mm2"] <= stats["roi_area_mm2"]
    rows = stats["roi"]
    assert [(r["name"], r["class"]) for r in rows] == [("Tumor A", "Tumor"), ("Tumor B", "Tumor")]
    for row, annotation in zip(rows, regions.annotations, strict=True):
        own = regions.masks(0, 0, *store.shape)[row["index"] - 1]
        assert row["area_mm2"] == pytest.approx(own.sum() * px_mm2)
        assert row["tissue_area_mm2"] == pytest.approx((labels[own] != 0).sum() * px_mm2)
        assert sum(row["class_fractions"].values()) == pytest.approx(1.0)
        assert row["area_mm2"] == pytest.approx(annotation.geometry.area * px_mm2, rel=0.01)
    overlap = sum(r["area_mm2"] for r in rows) - stats["roi_area_mm2"]
    assert overlap > 0.01  # overlapping annotations are each counted in full
    with (out / "CMU-1-Small-Region.roi.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["name"] for r in table] == ["Tumor A", "Tumor B"]
    assert float(table[0]["tissue_area_mm2"]) == pytest.approx(rows[0]["tissue_area_mm2"])
    assert "fraction malignant_epithelium" in table[0]


def _assert_geojson_inside(path: Path, drawn: shapely.Geometry, tolerance: float) -> None:
    collection = json.loads(path.read_text())
    geometries = [shape(f["geometry"]) for f in collection["features"]]
    assert geometries
    for geometry in geometries:
        assert geometry.is_valid and geometry.geom_type == "MultiPolygon"
        assert geometry.within(drawn.buffer(tolerance))
    classes = [  # tissue classes do not overlap; "Uncertain" marks part of them on purpose
        g
        for g, f in zip(geometries, collection["features"], strict=True)
        if f["properties"]["classification"]["name"] != "Uncertain"
    ]
    for i, a in enumerate(classes):
        for b in classes[i + 1 :]:
            assert a.intersection(b).area < 1.0


def test_exports_are_clipped_and_outlined_also_when_exported_later(cmu_runs):
    folder, user_roi = cmu_runs
    out = folder / "roi" / "CMU-1-Small-Region"
    store = open_store(out)
    drawn = shapely.union_all([shapely.Polygon(TUMOR_A), shapely.Polygon(TUMOR_B)])
    _assert_geojson_inside(out / "CMU-1-Small-Region.geojson", drawn, store.scale)  # 1 analysis px
    assert read_summary(out / "CMU-1-Small-Region.geojson")["roi"] == "CMU-1-Small-Region.roi.geojson"

    overlay = np.asarray(Image.open(out / "CMU-1-Small-Region.overlay.png").convert("RGB"))
    class_view = (overlay.shape[1] - LEGEND_WIDTH - GAP) // 2  # the confidence view is beside it
    picture = overlay[:, :class_view]
    ys, xs = np.nonzero((picture == OUTLINE_COLOR).all(axis=2))
    factor = picture.shape[1] / (store.shape[1] * store.scale)  # level-0 px → overlay px
    rings = shapely.union_all([shapely.Polygon(TUMOR_A).boundary, shapely.Polygon(TUMOR_B).boundary])
    boundary = shapely.affinity.scale(rings, factor, factor, origin=(0, 0))  # each annotation's outline
    perimeter = boundary.length
    assert len(xs) > perimeter  # a 2-px line along the whole outline
    distances = shapely.distance(boundary, shapely.points(xs + 0.5, ys + 0.5))
    assert np.percentile(distances, 99) < 3.0
    report = (out / "CMU-1-Small-Region.report.html").read_text()
    assert "Region of interest" in report and "Tumor B" in report

    user_roi.unlink()  # a later export reads the ROI from the result folder, not the user's file
    (out / "CMU-1-Small-Region.geojson").unlink()
    export_all(out, ("geojson",))
    _assert_geojson_inside(out / "CMU-1-Small-Region.geojson", drawn, store.scale)


# --- resume, and a <stem>.geojson beside the slide -------------------------------------------

RESUME = {
    "tile": 128,
    "halo": 64,
    "block": 256,
    "chunks_per_task": 2,
    "formats": (),
    "workers": 0,
    "quiet": True,
}
LEFT = [[0, 0], [1100, 0], [1100, 1536], [0, 1536], [0, 0]]
RIGHT = [[900, 0], [2048, 0], [2048, 1536], [900, 1536], [900, 0]]


def _interrupt(out: Path, drop_batches: int) -> None:
    """Make a complete output look interrupted: status running, the last batches not recorded."""
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "status": "running"}))
    for record in sorted((out / ".progress").glob("batch-*.json"))[:drop_batches]:
        record.unlink()


def test_resume_needs_the_same_roi(small_slide, tissue_card, tmp_path):
    left = _roi_file(tmp_path / "left.geojson", _annotation(LEFT, "left", "Tumor"))
    right = _roi_file(tmp_path / "right.geojson", _annotation(RIGHT, "right", "Tumor"))
    out, job = tmp_path / "out" / "small", SlideJob(small_slide)

    def segment(roi: Path):
        settings = load_settings(None, model=str(tissue_card), roi=roi, **RESUME)
        return run_segment([job], tmp_path / "out", settings)[0]

    assert segment(left).status == "done"
    first = _run_json(tmp_path / "out")["tiles"]["processed"]
    _interrupt(out, drop_batches=2)
    assert segment(left).status == "done"
    run = _run_json(tmp_path / "out")
    assert run["resumed"] is True and 0 < run["tiles"]["processed"] < first
    assert run["tiles"]["resumed_from_previous_run"] + run["tiles"]["processed"] == run["tiles"]["tissue"]

    refused = segment(right)  # complete results of another ROI are not replaced without --overwrite
    assert (
        refused.status == "failed"
        and "made with another ROI" in refused.error
        and "right.geojson" in refused.error
    )

    _interrupt(out, drop_batches=2)
    assert segment(right).status == "done"  # a partial output of another ROI starts afresh
    run = _run_json(tmp_path / "out")
    assert run["resumed"] is False and run["roi"]["source"] == str(right.resolve())
    assert read_roi(out / "small.roi.geojson").sha256 == run["roi"]["sha256"] == read_roi(right).sha256
    store = SlideStore.open(out / "small.ome.zarr")
    regions = read_roi(right).in_analysis(store.bounds_offset, store.scale, store.shape)
    labels = store.labels(0)[:]
    assert not labels[~regions.mask(0, 0, *store.shape)].any() and labels.any()


def test_a_geojson_beside_the_slide_is_not_used(small_slide, tissue_card, tmp_path, caplog):
    slide = tmp_path / "beside.tif"
    shutil.copyfile(small_slide, slide)
    _roi_file(tmp_path / "beside.geojson", _annotation(LEFT, "left", "Tumor"))
    logger = logging.getLogger("wsi_espnet")
    logger.addHandler(caplog.handler)
    try:
        settings = load_settings(None, model=str(tissue_card), **RESUME)
        assert run_segment([SlideJob(slide)], tmp_path / "out", settings)[0].status == "done"
    finally:
        logger.removeHandler(caplog.handler)
    out = tmp_path / "out" / "beside"
    run = json.loads((out / "run.json").read_text())
    assert "roi" not in run and "outside_roi" not in run["tiles"] and "roi" not in run["store_params"]
    assert not (out / "beside.roi.geojson").exists()
    assert "roi" not in json.loads((out / "beside.stats.json").read_text())
    assert "beside.geojson is not used as a region of interest" in caplog.text


# --- a slide with a bounds offset (QuPath's frame is OpenSlide's minus bounds-x/y) -----------


def test_bounds_offset_round_trip_in_the_exports(tmp_path):
    labels = np.zeros((64, 64), np.uint8)
    labels[8:56, 8:56] = 2
    store = write_store(tmp_path, labels, tile=32, n_levels=1, bounds_offset=(100, 50))  # 4 level-0 px / px
    # Analysis square (30..50)² is OpenSlide level-0 (120..200)², QuPath x 20..100, y 70..150.
    square = [[20, 70], [100, 70], [100, 150], [20, 150], [20, 70]]
    drawn = _roi_file(tmp_path / "drawn.geojson", _annotation(square, "sq", "Tumor"))
    write_normalised(read_roi(drawn), tmp_path / "slide.roi.geojson")
    collection = json.loads(write_geojson(store, tmp_path / "slide.geojson", simplify_px=0).read_text())
    [feature] = collection["features"]
    assert shape(feature["geometry"]).bounds == (20.0, 70.0, 100.0, 150.0)
    picture = np.asarray(render_overlay(open_store(store), None, None))[:, :-LEGEND_WIDTH]
    ys, xs = np.nonzero((picture == OUTLINE_COLOR).all(axis=2))
    factor = 1200 / 64  # the white overlay's longer side
    assert abs(xs.min() - 30 * factor) <= 2 and abs(xs.max() - 50 * factor) <= 2
    assert abs(ys.min() - 30 * factor) <= 2 and abs(ys.max() - 50 * factor) <= 2
