"""Overlay PNG, HTML report (parsed and rendered in headless Chromium) and export_all."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from export_stores import CLASSES, blob_labels, write_store
from PIL import Image

from wsi_espnet.errors import ConfigError
from wsi_espnet.export import THUMBNAIL_SIDE, export_all
from wsi_espnet.export.overlay import ALPHA, LEGEND_WIDTH, write_overlay
from wsi_espnet.export.report import write_report

GREY = 200


def _squares() -> np.ndarray:
    labels = np.zeros((400, 600), np.uint8)
    labels[100:300, 100:300] = 2
    labels[100:300, 350:550] = 4
    return labels


def _blend(base: int, color: list[int]) -> list[int]:
    return [round((1 - ALPHA) * base + ALPHA * c) for c in color]


def test_overlay_blends_classes_over_tissue_only(tmp_path: Path) -> None:
    labels = _squares()
    store = write_store(tmp_path, labels, tile=128)
    stats = json.loads((tmp_path / "slide.stats.json").read_text())
    thumbnail = np.full((200, 300, 3), GREY, np.uint8)  # half the analysis grid
    image = np.asarray(Image.open(write_overlay(store, tmp_path / "o.png", thumbnail, stats)).convert("RGB"))

    assert image.shape == (200, 300 + LEGEND_WIDTH, 3)
    assert image[100, 100].tolist() == _blend(GREY, CLASSES[2]["color"])
    assert image[100, 225].tolist() == _blend(GREY, CLASSES[4]["color"])
    assert image[10, 10].tolist() == [GREY] * 3  # background is left alone
    assert image[100, 160].tolist() == [GREY] * 3
    legend = image[:, 300:].reshape(-1, 3).tolist()
    for info in CLASSES[1:]:
        assert info["color"] in legend  # a swatch for every tissue class


def test_overlay_without_thumbnail_is_white_and_sized(tmp_path: Path) -> None:
    store = write_store(tmp_path, _squares(), tile=128, stats=False)
    image = np.asarray(Image.open(write_overlay(store, tmp_path / "o.png")).convert("RGB"))
    assert image.shape == (800, 1200 + LEGEND_WIDTH, 3)
    assert image[5, 5].tolist() == [255, 255, 255]
    assert image[400, 400].tolist() == _blend(255, CLASSES[2]["color"])


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_report_is_self_contained_and_has_the_table(tmp_path: Path) -> None:
    store = write_store(tmp_path, blob_labels((300, 400), seed=7), tile=128)
    path = write_report(store, tmp_path / "slide.report.html")
    page = path.read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(page)
    parser.close()

    tags = [tag for tag, _ in parser.tags]
    assert tags.count("table") >= 3  # classes, provenance, run parameters
    text = " ".join(parser.text)
    for info in CLASSES[1:]:
        assert info["name"] in text
    assert "test-model" in text and "0" * 64 in text
    assert "<b>escaped</b>" in text and "<b>escaped" not in page  # run.json text is escaped
    for _, attrs in parser.tags:  # nothing is fetched from elsewhere
        for key in ("src", "href"):
            assert not attrs.get(key, "data:").startswith(("http", "//", "file"))
    (src,) = [attrs["src"] for tag, attrs in parser.tags if tag == "img"]
    assert src.startswith("data:image/png;base64,")
    overlay = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert overlay.width > LEGEND_WIDTH


def _report_text(tmp_path: Path, run: dict | None, **store_options) -> tuple[str, str]:
    """Write a store (with ``run`` as its run.json), render the report, return (page, visible text)."""
    write_store(tmp_path, blob_labels((200, 260), seed=9), tile=64, run=False, **store_options)
    if run is not None:
        (tmp_path / "run.json").write_text(json.dumps(run))
    page = write_report(tmp_path / "slide", tmp_path / "slide.report.html").read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(page)
    return page, " ".join(" ".join(parser.text).split())


RUN = {
    "status": "complete",
    "slide": "/data/a.svs",
    "model": {
        "name": "breast-tissue-espnet",
        "trained": True,
        "description": "DEMO MODEL: trained on five ROIs only",
        "classes": CLASSES,
        "evaluation": {"dataset": "5 ROIs", "pixel_accuracy": 0.81},
    },
    "parameters": {"tile": 512, "halo": 256, "formats": ["geojson", "png"], "tissue_detection": True},
    "timings": {"inference_s": 12.5, "exports_s": 1.25},
    "warnings": ["a.svs: something to know"],
}


def test_report_shows_the_final_status_from_run_json(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, text = _report_text(tmp_path / "a", RUN)  # the store itself may still say running
    assert "Status: complete" in text and "had not finished" not in text
    assert "a.svs: something to know" in text
    _, text = _report_text(tmp_path / "b", {**RUN, "status": "exporting"})
    assert "Status: exporting (the run had not finished" in text


def test_report_renders_parameters_as_tables_and_the_model_caveat(tmp_path: Path) -> None:
    page, text = _report_text(tmp_path, RUN)
    assert "demonstration model, not validated for diagnosis" in text
    assert "DEMO MODEL: trained on five ROIs only" in text
    assert "pixel accuracy 0.81" in text.replace("_", " ")  # evaluation figures from the card
    assert "formats geojson, png" in text and "tissue detection yes" in text
    assert "inference s 12.5" in text
    assert '{"' not in page and "[&quot;" not in page  # no raw JSON left in any cell
    assert all(c["name"] in text for c in CLASSES)  # the model's class table


def test_report_copes_with_missing_and_odd_fields(tmp_path: Path) -> None:
    for index, run in enumerate([None, {}, {"model": "name-only", "parameters": [], "timings": None}]):
        folder = tmp_path / str(index)
        folder.mkdir()
        _, text = _report_text(folder, run)
        assert "Status: complete" in text  # the store's own status when run.json has none
        assert "benign_epithelium" in text
    _, text = _report_text(tmp_path / "0", {"model": {"name": "m", "trained": False}, "status": "failed"})
    assert "untrained weights" in text and "Status: failed" in text


def test_report_states_the_speck_threshold_and_what_was_dropped(tmp_path: Path) -> None:
    from wsi_espnet.export.geojson import write_geojson

    labels = blob_labels((200, 260), seed=9)
    labels[3:5, 3:5] = 2  # a 16 µm² speck
    store = write_store(tmp_path, labels, tile=64)
    write_geojson(store, tmp_path / "slide.geojson", min_area_um2=150)
    page = write_report(store, tmp_path / "slide.report.html").read_text(encoding="utf-8")
    assert "smaller than 150 µm²" in page and "specks dropped (mm²)" in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    store = write_store(tmp_path, blob_labels((300, 400), seed=8), tile=128)
    report = write_report(store, tmp_path / "slide.report.html")
    shot = tmp_path / "shot.png"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--hide-scrollbars",
        "--window-size=1280,1600",
        f"--screenshot={shot}",
        report.as_uri(),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=90)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1600, 1280)
    assert (pixels < 250).any(axis=2).mean() > 0.02  # text, table and overlay drawn, not a blank page
    colors = {tuple(p) for p in pixels[::4, ::4].reshape(-1, 3).tolist()}
    assert len(colors) > 50


def test_export_all_on_a_store_without_tissue(tmp_path: Path) -> None:
    write_store(tmp_path, np.zeros((100, 120), np.uint8), tile=64, n_levels=2, stats=False, run=False)
    written = export_all(tmp_path / "slide")
    assert sorted(written) == ["geojson", "html", "ometiff", "png"]
    assert all(p.is_file() for paths in written.values() for p in paths)
    (geojson,) = written["geojson"]
    assert json.loads(geojson.read_text())["features"] == []
    assert "No statistics" in written["html"][0].read_text()
    with pytest.raises(ConfigError, match="unknown export format"):
        export_all(tmp_path / "slide", formats=("geojson", "pdf"))


def test_export_all_reads_the_slide_thumbnail(tmp_path: Path) -> None:
    from wsi_espnet.sample import write_sample_slide

    slide = write_sample_slide(tmp_path / "slide.tif", 2400, 1600, mpp=0.5, tissue_fraction=0.4)
    write_store(tmp_path, _squares(), tile=128)  # 400 x 600 at 2 µm/px: the same extent as the slide
    attrs_path = tmp_path / "slide.ome.zarr" / ".zattrs"
    attrs = json.loads(attrs_path.read_text())
    attrs["wsi_espnet"]["slide"]["path"] = str(slide)
    attrs_path.write_text(json.dumps(attrs))
    (png,) = export_all(tmp_path / "slide", formats=("png",))["png"]
    image = np.asarray(Image.open(png).convert("RGB"))
    picture = image[:, : image.shape[1] - LEGEND_WIDTH]
    assert abs(picture.shape[1] - THUMBNAIL_SIDE) <= 1  # the thumbnail's size, not the white default
    assert len({tuple(p) for p in picture[::8, ::8].reshape(-1, 3).tolist()}) > 100  # slide texture
