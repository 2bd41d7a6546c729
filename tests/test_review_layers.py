"""The three review layers of one run together, end to end on real pixels: ``segment --roi`` with
``--tta 2`` and ``--qc exclude`` on CMU-1-Small-Region with pen strokes painted on.

Each layer has its own tests (test_roi*.py, test_confidence.py, test_tta.py, test_qc.py); this one
checks that they compose in the order the block writer applies them (tissue, ROI, QC, then the
confidence of what is left) and that every output shows all three.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
import tifffile
from click.testing import CliRunner
from shapely.geometry import shape

from benchmarks.qc_paint import paint_strokes
from wsi_espnet.cli import main
from wsi_espnet.qc_kinds import PEN
from wsi_espnet.roi import read_output_roi
from wsi_espnet.slide import Slide
from wsi_espnet.store import open_store

CMU1 = "wsi_aperio_cmu1_small_region/CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def review_run(shared_data, tissue_card, tmp_path_factory):
    slide = shared_data / CMU1
    if not slide.is_file():
        pytest.skip(f"{slide} not found (the real Aperio slide of ../shared/data)")
    folder = tmp_path_factory.mktemp("review")
    with Slide.open(slide) as opened:
        level0 = opened.read_region(0, 0, *opened.dimensions, opened.mpp)
        mpp = opened.mpp
    painted, masks = paint_strokes(level0, mpp, seed=5)
    path = folder / "painted.tif"
    tifffile.imwrite(
        path, painted, photometric="rgb", tile=(256, 256), compression="zlib",
        resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER",
    )  # fmt: skip
    height, width = painted.shape[:2]
    drawn = shapely.box(0, 0, int(0.6 * width), height)  # the left 60 % of the slide, level-0 px
    roi = folder / "drawn.geojson"
    feature = {
        "type": "Feature",
        "geometry": shapely.geometry.mapping(drawn),
        "properties": {"objectType": "annotation", "name": "Left", "classification": {"name": "Tumor"}},
    }
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    args = ["segment", path, "-o", folder / "out", "--model", tissue_card, "--roi", roi]
    args += ["--tta", "2", "--qc", "exclude", "--tile", "256", "--workers", "0", "-q"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    ink = np.logical_or.reduce(list(masks.values()))
    return folder / "out" / "painted", drawn, ink


def test_layers_compose_in_the_store(review_run):
    out, _, ink = review_run
    store = open_store(out)
    labels, confidence = np.asarray(store.labels(0)), np.asarray(store.confidence(0))
    artifacts = np.asarray(store.artifacts(0))
    inside = read_output_roi(store).mask(0, 0, *store.shape)
    assert inside.any() and not inside.all()
    assert not labels[~inside].any() and not artifacts[~inside].any()  # nothing outside the ROI
    assert not labels[artifacts > 0].any()  # --qc exclude: flagged pixels are no class
    assert not confidence[labels == 0].any() and confidence[labels > 0].min() > 0
    # The painted ink inside the ROI is flagged as pen, at analysis resolution.
    ink = ink[:: round(store.scale), :: round(store.scale)]  # level 0 → about 1 µm/px
    h, w = min(ink.shape[0], store.shape[0]), min(ink.shape[1], store.shape[1])
    ink_here, pen = ink[:h, :w] & inside[:h, :w], (artifacts == PEN)[:h, :w]
    assert ink_here.sum() > 1000 and (pen & ink_here).sum() / ink_here.sum() > 0.5


def test_statistics_cover_the_roi_with_confidence_and_artifacts(review_run):
    out, _, _ = review_run
    stats = json.loads((out / "painted.stats.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert run["parameters"]["tta"] == 2 and run["parameters"]["qc"] == "exclude" and run["roi"]
    assert stats["qc"] == "exclude" and stats["artifacts"]["pen"]["area_mm2"] > 0
    assert stats["tissue_area_mm2"] <= stats["roi_area_mm2"]
    [row] = stats["roi"]
    assert row["name"] == "Left" and row["tissue_area_mm2"] == pytest.approx(stats["tissue_area_mm2"])
    measured = [c for c in stats["classes"] if c["pixels"]]
    assert measured and all(0 < c["mean_confidence"] <= 1 for c in measured)
    assert 0 <= stats["uncertain_fraction_of_tissue"] <= 1


def test_every_output_shows_the_three_layers(review_run):
    out, drawn, _ = review_run
    collection = json.loads((out / "painted.geojson").read_text())
    names = {f["properties"]["classification"]["name"] for f in collection["features"]}
    assert "Artifact: pen" in names
    for feature in collection["features"]:  # clipped to the ROI (1 analysis px of tolerance)
        assert shape(feature["geometry"]).within(drawn.buffer(2.0))
    report = (out / "painted.report.html").read_text()
    assert "Region of interest" in report and "Artifacts (QC)" in report and "confidence" in report
    assert (out / "painted.roi.csv").is_file() and (out / "painted.artifacts.csv").is_file()
