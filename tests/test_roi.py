"""``--roi``: reading QuPath exports, the analysis frame, bad ROIs refused before Dask, settings and manifest.

The end-to-end runs (chunks, labels, statistics, exports, resume) are in ``test_roi_pipeline.py``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner
from shapely.geometry import shape

from wsi_espnet.cli import main
from wsi_espnet.config import SegmentSettings, load_settings
from wsi_espnet.errors import WsiEspnetError
from wsi_espnet.outputs import SlideOutput
from wsi_espnet.preflight import check_run
from wsi_espnet.roi import RoiError, check_roi, read_roi, roi_file_for
from wsi_espnet.runstate import SlideJob, read_manifest

SQUARE = [[[100, 100], [300, 100], [300, 300], [100, 300], [100, 100]]]
BOWTIE = [[[0, 0], [200, 200], [200, 0], [0, 200], [0, 0]]]


def _feature(coords, name=None, classification=None, kind="Polygon", object_type="annotation"):
    properties = {"objectType": object_type}
    if name is not None:
        properties["name"] = name
    if classification is not None:
        properties["classification"] = classification
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coords}, "properties": properties}


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


# --- the forms QuPath writes ------------------------------------------------------------------


def test_bare_geometry_from_qupaths_own_fixture(shared_data):
    path = shared_data / "qupath_json" / "polygon.geojson"
    roi = read_roi(path)
    [annotation] = roi.annotations
    raw = shape(json.loads(path.read_text()))
    assert annotation.name == "annotation 1" and annotation.classification is None
    assert len(annotation.geometry.geoms) == len(raw.geoms) == 3
    assert annotation.geometry.area == pytest.approx(raw.area)
    assert roi.repaired == []


def test_qupath_class_forms_current_derived_and_legacy(shared_data, tmp_path):
    """``{"name", "color"}`` (0.4+), ``{"names"}`` (0.6+ derived) and the legacy nested form."""
    derived = json.loads((shared_data / "qupath_json" / "derived-class.json").read_text())
    legacy = json.loads((shared_data / "qupath_json" / "derived-class-legacy.json").read_text())
    features = [
        _feature(SQUARE, "t", {"name": "Tumor", "color": [200, 0, 0]}),
        _feature(SQUARE, "d", derived),
        _feature(SQUARE, "l", legacy),
        _feature(SQUARE, "s", "Stroma"),  # pre-0.2 QuPath wrote the class as a string
    ]
    roi = read_roi(_write(tmp_path / "c.geojson", {"type": "FeatureCollection", "features": features}))
    got = {a.name: (a.classification, a.color) for a in roi.annotations}
    assert got["t"] == ("Tumor", (200, 0, 0))
    assert got["d"] == ("First: Second: Third: Fourth", (10, 20, 30))
    assert got["l"] == ("First-legacy: Second-legacy: Third-legacy: Fourth-legacy", (1, 2, 3))  # 0xFF010203
    assert got["s"] == ("Stroma", None)


def test_feature_list_single_feature_and_what_is_ignored(tmp_path):
    features = [
        _feature(SQUARE, "keep", {"name": "Tumor"}),
        _feature([5, 5], "a point", kind="Point"),
        _feature([[0, 0], [9, 9]], "a line", kind="LineString"),
        _feature(SQUARE, "a cell", object_type="cell"),
        _feature(SQUARE, "a detection", object_type="detection"),
    ]
    listed = read_roi(_write(tmp_path / "list.geojson", features))  # "Export as FeatureCollection" off
    assert [a.name for a in listed.annotations] == ["keep"]
    single = read_roi(_write(tmp_path / "one.geojson", features[0]))
    assert single.sha256 == listed.sha256  # the same region whatever the container
    collection = {
        "type": "FeatureCollection",
        "features": [{"type": "Feature", "properties": {}, "geometry": {"type": "GeometryCollection",
                      "geometries": [{"type": "Polygon", "coordinates": SQUARE},
                                     {"type": "Point", "coordinates": [1, 1]}]}}],
    }  # fmt: skip
    [part] = read_roi(_write(tmp_path / "gc.geojson", collection)).annotations
    assert part.geometry.area == 200 * 200


def test_zipped_export_is_read(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "objects.zip", "w") as archive:
        archive.writestr("objects.geojson", json.dumps([_feature(SQUARE, "z", {"name": "Tumor"})]))
    [annotation] = read_roi(tmp_path / "objects.zip").annotations
    assert annotation.name == "z" and annotation.geometry.area == 200 * 200
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as archive:
        archive.writestr("a.geojson", "[]")
        archive.writestr("b.geojson", "[]")
    with pytest.raises(RoiError, match="ZIP archive with 2 GeoJSON files"):
        read_roi(tmp_path / "two.zip")


def test_roi_class_filter_and_repair_of_a_bowtie(tmp_path, caplog):
    features = [
        _feature(BOWTIE, "bow", {"name": "Tumor", "color": [1, 2, 3]}),
        _feature(SQUARE, "other", {"name": "Stroma"}),
        _feature(SQUARE, "plain"),
    ]
    path = _write(tmp_path / "r.geojson", {"type": "FeatureCollection", "features": features})
    assert len(read_roi(path).annotations) == 3
    roi = read_roi(path, ("Tumor",))
    [bow] = roi.annotations
    assert bow.geometry.is_valid and len(bow.geometry.geoms) == 2
    assert bow.geometry.area == pytest.approx(2 * 100 * 200 / 2)  # two triangles
    assert roi.repaired and roi.repaired[0].startswith("bow: Self-intersection")
    job = SlideJob(tmp_path / "slide.svs")
    settings = SegmentSettings(roi=path, roi_classes=("Tumor",))
    logger = logging.getLogger("wsi_espnet")  # the CLI stops it propagating to caplog's root handler
    logger.addHandler(caplog.handler)
    try:
        check_roi(job, settings, ((1000, 1000), (0, 0)), SlideOutput.for_slide(tmp_path / "out", job.path))
    finally:
        logger.removeHandler(caplog.handler)
    assert "repaired with shapely.make_valid" in caplog.text and "Self-intersection" in caplog.text


def test_normalised_copy_reads_back_to_the_same_roi(tmp_path):
    from wsi_espnet.roi import write_normalised

    features = [_feature(BOWTIE, "bow", {"name": "Tumor"}), _feature(SQUARE)]
    roi = read_roi(_write(tmp_path / "r.geojson", features))
    write_normalised(roi, tmp_path / "copy.roi.geojson")
    copy = read_roi(tmp_path / "copy.roi.geojson")
    assert copy.sha256 == roi.sha256 and copy.repaired == []  # repaired once, stored valid
    meta = json.loads((tmp_path / "copy.roi.geojson").read_text())["wsi_espnet"]
    assert meta["source"] == str((tmp_path / "r.geojson").resolve()) and meta["repaired"]
    assert all(f["properties"]["objectType"] == "annotation" for f in copy.collection()["features"])


def test_analysis_frame_adds_the_bounds_offset_then_scales(tmp_path):
    roi = read_roi(_write(tmp_path / "r.geojson", _feature(SQUARE)))
    # QuPath (100, 100) is OpenSlide level-0 (100 + 40, 100 + 20); at 4 level-0 px per analysis px
    regions = roi.in_analysis((40, 20), 4.0, (1000, 1000))
    assert regions.union.bounds == (35.0, 30.0, 85.0, 80.0)
    mask = regions.mask(0, 0, 100, 100)
    assert mask.sum() == 50 * 50 and mask[30, 35] and not mask[29, 35] and not mask[30, 85]
    clipped = roi.in_analysis((40, 20), 4.0, (60, 60))  # the slide ends at 60 analysis px
    assert clipped.union.bounds == (35.0, 30.0, 60.0, 60.0)
    with pytest.raises(RoiError, match="entirely outside the slide"):
        roi.check_inside((1000, 1000), (-400, -400))


# --- bad ROIs: one line naming the file, exit 1, nothing written, no cluster ------------------


def _refused(args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()  # no "Dask dashboard" line: no cluster was started
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


FAR = [[[5000, 5000], [6000, 5000], [6000, 6000], [5000, 5000]]]  # the slide is 2048 x 1536 px
TWO = [_feature(SQUARE, "a", {"name": "Stroma"}), _feature(SQUARE)]
BAD_ROIS = {
    "not-json": ('{"type": "FeatureCollection", "features": [', "is not JSON"),
    "not-geojson": ('{"hello": 1}', "not GeoJSON"),
    "no-polygon": (json.dumps(_feature([5, 5], kind="Point")), "no polygon annotation"),
    "wrong-class": (json.dumps(TWO), "class Tumor (--roi-class); the file has: Stroma, unclassified"),
    "outside": (json.dumps(_feature(FAR)), "entirely outside"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_ROIS))
def test_bad_roi_is_refused_before_dask(case, small_slide, tissue_card, tmp_path):
    text, needle = BAD_ROIS[case]
    roi = _write(tmp_path / f"{case}.geojson", text)
    out = tmp_path / "out"
    args = ["segment", small_slide, "-o", out, "--model", tissue_card, "--roi", roi, "--roi-class", "Tumor"]
    line = _refused(args if case == "wrong-class" else args[:-2])
    assert str(roi) in line and needle in line, line
    assert not out.exists()


def test_missing_roi_and_roi_class_without_roi(small_slide, tissue_card, tmp_path):
    out = tmp_path / "out"
    base = ["segment", small_slide, "-o", out, "--model", tissue_card]
    line = _refused([*base, "--roi", tmp_path / "nope.geojson"])
    assert "nope.geojson" in line and "no such ROI file" in line
    line = _refused([*base, "--roi-class", "Tumor"])
    assert str(small_slide) in line and "--roi-class needs --roi" in line
    assert not out.exists()


# --- settings, config file and manifest -------------------------------------------------------


def test_config_file_keys_and_command_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("roi: area.geojson\nroi-class: Tumor\n")
    settings = load_settings(config)
    assert settings.roi == Path("area.geojson") and settings.roi_classes == ("Tumor",)
    config.write_text("roi_classes: [Tumor, Stroma]\n")
    assert load_settings(config).roi_classes == ("Tumor", "Stroma")
    assert load_settings(None, roi_classes=("A", "B")).roi_classes == ("A", "B")
    record = load_settings(None, roi=Path("x.geojson")).as_record()
    assert record["roi"] == "x.geojson" and record["roi_classes"] == []
    with pytest.raises(WsiEspnetError, match="needs a class name"):
        load_settings(None, roi_classes=(" ",))


def test_manifest_roi_column_is_per_slide_and_wins(tmp_path):
    (tmp_path / "rois").mkdir()
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"slide,roi\na.svs,rois/a.geojson\nb.svs,\nc.svs,{tmp_path / 'abs.geojson'}\n")
    a, b, c = read_manifest(manifest)
    assert a.roi == tmp_path / "rois" / "a.geojson" and b.roi is None and c.roi == tmp_path / "abs.geojson"
    settings = SegmentSettings(roi=Path("run.geojson"))
    assert roi_file_for(a, settings) == a.roi and roi_file_for(b, settings) == Path("run.geojson")


def test_a_bad_per_slide_roi_fails_only_its_slide(small_slide, tissue_card, tmp_path):
    good = _write(tmp_path / "good.geojson", _feature(SQUARE))
    bad = _write(tmp_path / "bad.geojson", "not json")
    other = tmp_path / "other.tif"
    other.write_bytes(small_slide.read_bytes())
    jobs = [SlideJob(small_slide, roi=good), SlideJob(other, roi=bad)]
    refused = check_run(jobs, tmp_path / "out", SegmentSettings(model=str(tissue_card)))
    assert list(refused) == [jobs[1]]
    assert "bad.geojson" in refused[jobs[1]].error and "is not JSON" in refused[jobs[1]].error


def test_chunk_masks_tile_the_whole_mask_without_seams(shared_data):
    """Blocks and chunks burn the ROI on their own; together they must give the one whole mask."""
    import numpy as np

    roi = read_roi(shared_data / "qupath_json" / "polygon.geojson")  # 1553 vertices, 3 parts
    regions = roi.in_analysis((0, 0), 8.0, (1250, 1250))
    whole = regions.mask(0, 0, 1280, 1280)
    tiled = np.zeros_like(whole)
    for y in range(0, 1280, 128):
        for x in range(0, 1280, 128):
            tiled[y : y + 128, x : x + 128] = regions.mask(y, x, 128, 128)
    assert whole.any() and (tiled == whole).all()
    assert abs(int(whole.sum()) - regions.union.area) < 0.01 * regions.union.area
