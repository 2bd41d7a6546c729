"""Artifact QC on real pixels: painted pen strokes, a defocused band, a fold, the unpainted slides,
a fluorescence slide, and ``--qc off|flag|exclude`` end to end through ``segment``."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image
from skimage import color

from benchmarks.qc_paint import (
    analyse,
    blur_band,
    flagged_fractions,
    fluorescence_image,
    fold,
    iou,
    paint_strokes,
)
from wsi_espnet.config import load_settings
from wsi_espnet.pipeline import run_segment
from wsi_espnet.qc import artifact_map
from wsi_espnet.qc_kinds import BLUR, FOLD, PEN
from wsi_espnet.runstate import SlideJob
from wsi_espnet.slide import Slide
from wsi_espnet.store import SlideStore

MPP = 1.0  # the shipped card's analysis resolution
CMU1 = "wsi_aperio_cmu1_small_region/CMU-1-Small-Region.svs"
UNPAINTED = [
    CMU1,
    "wsi_derived_pyramids/CMU-1-Small-Region.pyramid.tif",
    "wsi_derived_pyramids/CMU-1-Small-Region.pyramid.ome.tif",
]


@pytest.fixture(scope="module")
def cmu1(shared_data):
    return analyse(shared_data / CMU1, MPP)


def test_painted_pen_strokes_are_found(cmu1):
    image, _, plan = cmu1
    for seed in (0, 1, 2):
        painted, masks = paint_strokes(image, MPP, seed)
        found = artifact_map(painted, MPP, plan.reference) == PEN
        truth = np.logical_or.reduce(list(masks.values()))
        assert iou(found, truth) >= 0.7, (seed, iou(found, truth))
        for ink, mask in masks.items():  # every ink colour is found, not just some
            assert np.count_nonzero(found & mask) / np.count_nonzero(mask) > 0.5, (seed, ink)


def test_block_cores_agree_with_the_whole_image(cmu1):
    """QC of 512-px block cores, each seen with a 256-px halo as segment's blocks are, matches QC
    of the whole image: blocks agree at their seams."""
    image, _, plan = cmu1
    painted, _ = paint_strokes(image, MPP, seed=0)
    whole = artifact_map(painted, MPP, plan.reference)
    tile, halo = 512, 256
    padded = np.pad(painted, ((halo, halo + tile), (halo, halo + tile), (0, 0)), constant_values=255)
    stitched = np.zeros_like(whole)
    for y in range(0, whole.shape[0], tile):
        for x in range(0, whole.shape[1], tile):
            window = padded[y : y + tile + 2 * halo, x : x + tile + 2 * halo]
            core = (slice(halo, halo + tile), slice(halo, halo + tile))
            h, w = stitched[y : y + tile, x : x + tile].shape
            stitched[y : y + tile, x : x + tile] = artifact_map(window, MPP, plan.reference, core=core)[
                :h, :w
            ]
    assert np.mean(stitched == whole) > 0.995
    assert iou(stitched == PEN, whole == PEN) > 0.97


def test_blurred_band_is_out_of_focus(cmu1):
    image, tissue, plan = cmu1
    band = slice(400, 800)
    inside = np.zeros(tissue.shape, bool)
    inside[band] = True
    away = np.ones(tissue.shape, bool)  # beyond the 32 µm sharpness window and its cells from the band
    away[band.start - 48 : band.stop + 48] = False
    for sigma_um in (2.0, 3.0):  # defocus of a 20x scan: a few µm
        found = artifact_map(blur_band(image, band, sigma_um / MPP), MPP, plan.reference) == BLUR
        recall = np.count_nonzero(found & inside & tissue) / np.count_nonzero(inside & tissue)
        elsewhere = np.count_nonzero(found & away & tissue) / np.count_nonzero(away & tissue)
        assert recall > 0.7 and elsewhere < 0.01, (sigma_um, recall, elsewhere)


def test_a_fold_is_found(cmu1):
    image, tissue, plan = cmu1
    box = (slice(900, 1100), slice(300, 700))
    shift = (60, 40)
    found = artifact_map(fold(image, box, shift), MPP, plan.reference) == FOLD
    double = np.zeros(tissue.shape, bool)
    double[box] = True
    double &= tissue & np.roll(tissue, shift, axis=(0, 1))  # two layers of tissue
    assert np.count_nonzero(found & double) / np.count_nonzero(double) > 0.4
    assert np.count_nonzero(found & ~double) < 0.01 * np.count_nonzero(tissue)


@pytest.mark.parametrize("relative", UNPAINTED, ids=["svs", "generic-tiff", "ome-tiff"])
def test_unpainted_slides_are_barely_flagged(shared_data, relative):
    fractions, plan = flagged_fractions(shared_data / relative, MPP)
    assert sum(fractions.values()) < 0.02 and not plan.reference.warnings, (fractions, plan.reference)


def test_tissue_marking_dye_is_not_taken_for_ink(cmu1):
    """CMU-1-Small-Region's green-blue margin dye (hue 0.35-0.6, saturation > 0.2) is flecks of a few
    hundred µm², below the area of a marker stroke: measured, and not flagged (docs/qc.md)."""
    image, tissue, plan = cmu1
    hsv = color.rgb2hsv(image)
    dye = (hsv[..., 0] > 0.35) & (hsv[..., 0] < 0.6) & (hsv[..., 1] > 0.2) & tissue
    assert 0.003 < np.count_nonzero(dye) / np.count_nonzero(tissue) < 0.03
    pen = artifact_map(image, MPP, plan.reference) == PEN
    assert np.count_nonzero(pen & dye) == 0


def test_ynet_rois_are_barely_flagged(shared_data, tmp_path):
    """The five Y-Net breast ROIs, written as slides at their estimated resolution (0.25 µm/px x the
    file name's last number, PROVENANCE.md) and analysed at 1 µm/px like segment does."""
    images = sorted((shared_data / "ynet_breast_biopsy" / "images").glob("*.png"))
    assert len(images) == 5
    for png in images:
        mpp = 0.25 * float(png.stem.rsplit("_", 1)[1])
        slide = tmp_path / f"{png.stem}.tif"
        pixels = np.asarray(Image.open(png).convert("RGB"))
        tifffile.imwrite(
            slide, pixels, photometric="rgb", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER"
        )
        fractions, plan = flagged_fractions(slide, MPP)
        assert sum(fractions.values()) < 0.02 and not plan.reference.warnings, (png.name, fractions)


# --- end to end through segment ------------------------------------------------------------------


def _segment(slide, outdir, card, **overrides):
    base = {"model": str(card), "quiet": True, "workers": 0, "tile": 512, "halo": 64}
    settings = load_settings(None, **(base | overrides))
    result = run_segment([SlideJob(slide)], outdir, settings)[0]
    assert result.status == "done", result.error
    folder = next(outdir.glob("*/*.ome.zarr")).parent
    return SlideStore.open(next(folder.glob("*.ome.zarr")), mode="r"), folder, result


def _write_tiff(path, pixels, mpp):
    tifffile.imwrite(
        path, pixels, photometric="rgb", tile=(256, 256), compression="zlib",
        resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER",
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def painted_runs(shared_data, tissue_card, tmp_path_factory):
    """CMU-1-Small-Region with painted strokes (level 0), segmented with --qc flag and exclude."""
    folder = tmp_path_factory.mktemp("painted")
    with Slide.open(shared_data / CMU1) as slide:
        level0 = slide.read_region(0, 0, *slide.dimensions, slide.mpp)
        mpp = slide.mpp
    painted, masks = paint_strokes(level0, mpp, seed=5)
    path = _write_tiff(folder / "painted.tif", painted, mpp)
    truth = np.logical_or.reduce(list(masks.values()))
    runs = {
        mode: _segment(path, folder / mode, tissue_card, qc=mode, zarr_format=fmt)
        for mode, fmt in (("flag", 2), ("exclude", 3))
    }
    return runs, truth


def test_segment_flags_the_painted_strokes_in_the_store(painted_runs):
    runs, truth = painted_runs
    store, folder, _ = runs["flag"]
    artifacts, labels = store.artifacts(0)[:], store.labels(0)[:]
    # The painted mask on the analysis grid: the share of each analysis pixel that was painted.
    height, width = labels.shape
    share = np.asarray(
        Image.fromarray(truth.astype(np.float32)).resize((width, height), Image.Resampling.BOX)
    )
    tissue = labels != 0  # artifacts are only stored on labelled tissue
    assert iou((artifacts == PEN) & tissue, (share > 0.5) & tissue) >= 0.7
    assert store.artifacts(1).shape == store.labels(1).shape  # its own mode pyramid
    stats = json.loads((folder / "painted.stats.json").read_text())
    assert stats["qc"] == "flag"
    pen = stats["artifacts"]["pen"]
    assert pen["pixels"] == np.count_nonzero(artifacts == PEN)
    assert pen["area_mm2"] == pytest.approx(pen["pixels"] * store.mpp**2 / 1e6)
    assert pen["fraction_of_tissue"] == pytest.approx(pen["pixels"] / stats["tissue_pixels"])
    with open(folder / "painted.artifacts.csv") as handle:
        rows = {row["kind"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"pen", "blur", "fold"} and int(rows["pen"]["pixels"]) == pen["pixels"]
    run = json.loads((folder / "run.json").read_text())
    assert run["parameters"]["qc"] == "flag" and run["qc"]["mode"] == "flag"
    assert run["store_params"]["qc"] == "flag"
    assert run["timings"]["qc_s"] > 0 and run["qc"]["reference"]["tiles"] > 0


def test_exclude_removes_exactly_the_flagged_tissue(painted_runs):
    runs, _ = painted_runs
    flag_store, flag_folder, flag_result = runs["flag"]
    store, folder, result = runs["exclude"]
    flagged = flag_store.artifacts(0)[:]
    np.testing.assert_array_equal(store.artifacts(0)[:], flagged)
    before, after = flag_store.labels(0)[:], store.labels(0)[:]
    np.testing.assert_array_equal(after, np.where(flagged != 0, 0, before))
    flag_stats = json.loads((flag_folder / "painted.stats.json").read_text())
    stats = json.loads((folder / "painted.stats.json").read_text())
    assert stats["qc"] == "exclude"
    removed = sum(row["pixels"] for row in flag_stats["artifacts"].values())
    assert removed > 0 and flag_stats["tissue_pixels"] - stats["tissue_pixels"] == removed
    area = removed * store.mpp**2 / 1e6
    assert flag_result.tissue_area_mm2 - result.tissue_area_mm2 == pytest.approx(area)
    for row_before, row_after in zip(flag_stats["classes"], stats["classes"], strict=True):
        value = row_before["label"]
        assert row_before["pixels"] - row_after["pixels"] == np.count_nonzero(
            (before == value) & (flagged != 0)
        )
    # Fractions are of the tissue before exclusion, so both runs report the same artifact shares.
    for kind, row in stats["artifacts"].items():
        assert row["fraction_of_tissue"] == pytest.approx(flag_stats["artifacts"][kind]["fraction_of_tissue"])


@pytest.mark.parametrize("mode", ["flag", "exclude"])
def test_artifacts_layer_validates_with_ome_zarr_models(painted_runs, mode):
    import importlib

    store, _, _ = painted_runs[0][mode]
    models = importlib.import_module(
        "ome_zarr_models.v04" if store.zarr_format == 2 else "ome_zarr_models.v05"
    )
    group = zarr.open_group(store.path, mode="r")
    models.Image.from_zarr(group)
    label = models.ImageLabel.from_zarr(group["labels/artifacts"])
    image_label = label.ome_attributes.image_label
    assert [p.name for p in image_label.properties] == ["none", "pen", "blur", "fold"]
    labels_attrs = dict(group["labels"].attrs)
    names = labels_attrs["labels"] if store.zarr_format == 2 else labels_attrs["ome"]["labels"]
    assert names == ["tissue", "artifacts"]
    assert store.qc_mode == mode


def test_exports_show_the_artifacts(painted_runs):
    _, folder, _ = painted_runs[0]["flag"]
    collection = json.loads((folder / "painted.geojson").read_text())
    pens = [f for f in collection["features"] if f["properties"]["classification"]["name"] == "Artifact: pen"]
    assert pens and all(f["properties"]["isLocked"] for f in pens)
    assert pens[0]["properties"]["classification"]["color"] == [0, 200, 255]
    overlay = np.asarray(Image.open(folder / "painted.overlay.png").convert("RGB"))
    assert np.count_nonzero(np.all(overlay == (0, 200, 255), axis=-1)) > 100  # hatched pen ink
    report = (folder / "painted.report.html").read_text()
    assert "Artifacts (QC)" in report and "pen" in report and "only flagged" in report
    excluded = json.loads((painted_runs[0]["exclude"][1] / "painted.geojson").read_text())
    names = {f["properties"]["classification"]["name"] for f in excluded["features"]}
    assert "Artifact: pen" in names


def test_qc_off_writes_no_artifacts_layer(small_slide, tissue_card, tmp_path):
    store, folder, _ = _segment(small_slide, tmp_path, tissue_card, qc="off", tile=256, formats=("png",))
    assert store.artifacts(0) is None and store.qc_mode == "off"
    stats = json.loads((folder / "small.stats.json").read_text())
    assert stats["qc"] == "off" and stats["artifacts"] == {}
    assert not (folder / "small.artifacts.csv").exists()
    assert "artifacts" not in zarr.open_group(store.path / "labels", mode="r").attrs["labels"]


def test_fluorescence_slide_is_not_reported_as_all_artifact_without_a_warning(tissue_card, tmp_path):
    """Dark background, bright green and blue signal: QC warns, and --qc exclude is not applied."""
    slide = _write_tiff(tmp_path / "fluo.tif", fluorescence_image(1024, seed=0), 0.5)  # 512 µm at 0.5 µm/px
    _, folder, result = _segment(
        slide, tmp_path / "out", tissue_card, qc="exclude", tile=256, formats=("html",)
    )
    run = json.loads((folder / "run.json").read_text())
    assert any("not a bright-field" in w for w in run["warnings"]), run["warnings"]
    assert any("exclude was not applied" in w for w in run["warnings"])
    assert "not a bright-field" in result.warnings
    with open(tmp_path / "out" / "summary.csv") as handle:
        assert "not a bright-field" in next(csv.DictReader(handle))["warnings"]
    assert "not a bright-field" in (folder / "fluo.report.html").read_text()
    stats = json.loads((folder / "fluo.stats.json").read_text())
    assert stats["qc"] == "flag"  # labels untouched: the signal stays in the class statistics


def test_store_without_qc_has_no_artifacts_and_refuses_them(tmp_path):
    from wsi_espnet.grid import TileGrid

    classes = [
        {"value": 0, "name": "background", "color": [0, 0, 0]},
        {"value": 1, "name": "a", "color": [1, 2, 3]},
    ]
    plain = SlideStore.create(tmp_path / "a.ome.zarr", TileGrid((600, 600), 256, 0), 1.0, classes)
    assert plain.artifacts(0) is None and plain.qc_mode == "off"
    with pytest.raises(ValueError, match="artifacts"):
        plain.write_chunk(
            (0, 0), np.zeros((2, 256, 256)), np.zeros((256, 256)), artifacts=np.ones((256, 256))
        )
    qc = SlideStore.create(
        tmp_path / "b.ome.zarr", TileGrid((600, 600), 256, 0), 1.0, classes, attrs={"qc": "exclude"}
    )
    qc.write_chunk((0, 0), np.zeros((2, 256, 256)), np.ones((256, 256)), artifacts=np.full((256, 256), 2))
    qc.build_pyramid([(0, 0)])
    assert qc.qc_mode == "exclude" and (qc.artifacts(1)[:128, :128] == 2).all()


def test_bad_qc_value_is_a_one_line_error(small_slide, tmp_path):
    from click.testing import CliRunner

    from wsi_espnet.cli import main

    result = CliRunner().invoke(main, ["segment", str(small_slide), "-o", str(tmp_path), "--qc", "maybe"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["Error: --qc must be one of off, flag, exclude, got 'maybe'"], result.output
