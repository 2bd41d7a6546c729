"""The real slides in ../shared/data: SVS, generic TIFF pyramid and OME-TIFF pyramid, and seams."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsi_espnet.config import SegmentSettings, load_settings
from wsi_espnet.pipeline import run_segment
from wsi_espnet.runstate import SlideJob
from wsi_espnet.store import SlideStore

SLIDES = {
    "svs": "wsi_aperio_cmu1_small_region/CMU-1-Small-Region.svs",
    "generic-tiff": "wsi_derived_pyramids/CMU-1-Small-Region.pyramid.tif",
    "ome-tiff": "wsi_derived_pyramids/CMU-1-Small-Region.pyramid.ome.tif",
}


def _segment(slide, outdir, **overrides):
    settings = load_settings(None, quiet=True, workers=0, **overrides)
    result = run_segment([SlideJob(slide)], outdir, settings)[0]
    assert result.status == "done", result.error
    store = next(outdir.glob("*/*.ome.zarr"))
    return SlideStore.open(store), result


@pytest.fixture(scope="module")
def real_runs(shared_data, tmp_path_factory):
    runs = {}
    for name, relative in SLIDES.items():
        outdir = tmp_path_factory.mktemp(name)
        formats = ("geojson", "ometiff", "png", "html") if name == "svs" else ("geojson",)
        runs[name] = (_segment(shared_data / relative, outdir, tile=512, formats=formats), outdir)
    return runs


@pytest.mark.parametrize("name", list(SLIDES))
def test_real_slide_segments_completely(real_runs, name):
    (store, result), outdir = real_runs[name]
    assert store.status == "complete"
    assert store.labels(0).shape == (1481, 1108)  # 2967 x 2220 level-0 px at 0.499 µm → 1 µm/px
    run = json.loads(next(outdir.glob("*/run.json")).read_text())
    backend = run["slide_metadata"]["backend"]
    assert backend == ("tiffslide" if name == "ome-tiff" else "openslide")
    assert 0.1 < result.tissue_area_mm2 < 1.5  # the crop is roughly a third tissue, ~1.6 mm² in all


def test_three_containers_of_the_same_pixels_agree(real_runs):
    labels = {name: real_runs[name][0][0].labels(0)[:] for name in SLIDES}
    # Same tissue; the pyramids re-encode JPEG and are read from their LANCZOS level 1 rather than
    # box-filtering level 0, so class borders move a little (measured: 96.9 %).
    assert (labels["svs"] == labels["generic-tiff"]).mean() > 0.95
    assert (labels["svs"] == labels["ome-tiff"]).mean() > 0.95
    # Tissue versus glass is decided at analysis resolution, so the tissue area is the same
    # whatever container holds the pixels (it spread 5 % with the 16 µm/px thumbnail mask).
    areas = [real_runs[name][0][1].tissue_area_mm2 for name in SLIDES]
    assert max(areas) / min(areas) < 1.01, areas


def test_labels_are_cut_at_analysis_resolution(real_runs, shared_data):
    """Labelled tissue stops where the 1 µm/px pixels stop being tissue, not on the 16 µm/px
    thumbnail's staircase: outside the refined mask (computed once over the whole image) there
    are no labels, though the thumbnail mask covers 0.03 mm² more there."""
    from wsi_espnet.slide import Slide
    from wsi_espnet.tissue import detect_tissue

    labels = real_runs["svs"][0][0].labels(0)[:]
    with Slide.open(shared_data / SLIDES["svs"]) as slide:
        tissue = detect_tissue(slide)
        rgb = slide.read_region(0, 0, labels.shape[1], labels.shape[0], 1.0)
    refined = tissue.refine(rgb, 0, 0, 1.0)
    coarse = tissue.region(0, 0, *labels.shape, 1.0)
    assert (coarse & ~refined).sum() > 20_000  # the staircase and gaps the old mask labelled
    assert ((labels > 0) & ~refined).mean() < 0.001  # tiled vs whole-image edges: measured 0.02 %
    assert ((labels > 0) & refined).sum() > 0.85 * refined.sum()  # the model labels the tissue


def test_default_halo_makes_seams_invisible(shared_data, tmp_path):
    """Labels from 256-px tiles equal those from one tile over the whole image (>= 99.9 %)."""
    slide = shared_data / SLIDES["svs"]
    halo = SegmentSettings().halo
    whole, _ = _segment(slide, tmp_path / "whole", tile=1488, halo=halo, tissue_detection=False, formats=())
    # One chunk per block is the worst case for seams (every chunk border is a window border);
    # the default blocks follow the tissue and have fewer seams still.
    for block in (256, None):
        out = tmp_path / f"tiled-{block}"
        tiled, _ = _segment(slide, out, tile=256, halo=halo, block=block, tissue_detection=False, formats=())
        agreement = float((whole.labels(0)[:] == tiled.labels(0)[:]).mean())
        assert agreement >= 0.999, (block, agreement)


def test_evaluate_gives_the_labels_segment_writes(shared_data, tmp_path):
    """One inference path: ``evaluate``'s tiling of a region larger than one window (3 x 3 chunks
    of 512) gives exactly the labels ``segment`` writes for it."""
    from wsi_espnet.models.cards import load_card
    from wsi_espnet.slide import Slide
    from wsi_espnet.train.evaluate import predict_labels

    slide = shared_data / SLIDES["svs"]
    segmented, _ = _segment(slide, tmp_path / "seg", tissue_detection=False, formats=())
    card = load_card(SegmentSettings().model)
    with Slide.open(slide) as opened:
        height, width = opened.analysis_shape(card.mpp)
        image = opened.read_region(0, 0, width, height, card.mpp)
    evaluated = predict_labels(card.build_model(), card, image)
    np.testing.assert_array_equal(evaluated, segmented.labels(0)[:])


def test_breast_roi_is_segmented_into_its_classes(shared_data, tmp_path):
    """A real breast-biopsy ROI, written as a slide, runs through the whole path to sane labels."""
    import tifffile
    from PIL import Image

    roi = shared_data / "ynet_breast_biopsy"
    image = np.asarray(Image.open(roi / "images" / "1222_1_1200_4800_4.png").convert("RGB"))
    mask = np.asarray(Image.open(roi / "masks" / "1222_1_1200_4800_4.png"))[..., 0]
    slide = tmp_path / "roi.tif"
    # The file name's last number (4) puts this ROI at about 1 µm/px (PROVENANCE.md).
    tifffile.imwrite(slide, image, photometric="rgb", resolution=(1e4, 1e4), resolutionunit="CENTIMETER")
    store, _ = _segment(slide, tmp_path / "out", tile=128, tissue_detection=False, formats=())
    labels = store.labels(0)[:]
    assert labels.shape == mask.shape
    # A sanity check of the path (reading, normalisation, stitching), not of accuracy: the ROI is
    # all tissue, and the demo model (which saw it in training) gets most pixels' class right.
    assert ((labels != 0) == (mask != 0)).mean() > 0.9
    assert (labels == mask).mean() > 0.4


def test_report_states_the_final_status_and_the_demo_models_caveat(real_runs):
    """The report is written after completion, and says the shipped model is a demo with its
    leave-one-out figures (from the card, through run.json)."""
    (store, _), _ = real_runs["svs"]
    run = json.loads((store.path.parent / "run.json").read_text())
    assert run["status"] == "complete" and run["model"]["evaluation"]["loo_miou"] == 0.155
    html = next(store.path.parent.glob("*.report.html")).read_text()
    assert "complete" in html and "exporting" not in html
    assert "demonstration model" in html and "0.155" in html


def test_real_slide_exports_open_in_qupath_and_read_back(real_runs):
    """All four exports of the real SVS: QuPath rules, round trip, OME-TIFF, PNG, HTML."""
    from html.parser import HTMLParser

    import rasterio.features
    import tifffile
    from affine import Affine
    from PIL import Image
    from qupath_rules import check_feature_collection

    from wsi_espnet.export.geojson import write_geojson

    (store, _), _ = real_runs["svs"]
    folder = store.path.parent
    labels = store.labels(0)[:]
    values = {c.name: c.value for c in store.classes}

    def round_trip(path):
        collection = json.loads(path.read_text())
        assert check_feature_collection(collection) == []
        # Every tissue class burns back; "Uncertain" is a review overlay on top of them, not a label.
        named = [(f["geometry"], f["properties"]["classification"]["name"]) for f in collection["features"]]
        shapes = [(geometry, values[name]) for geometry, name in named if name != "Uncertain"]
        scale = store.mpp / 0.499  # level-0 pixels per analysis pixel
        burnt = rasterio.features.rasterize(shapes, out_shape=labels.shape, transform=Affine.scale(scale))
        tissue = (labels > 0) | (burnt > 0)
        return (burnt[tissue] == labels[tissue]).mean()

    # Defaults drop specks < 100 µm² and simplify by ~1 px: measured 94.4 % of tissue pixels agree.
    assert round_trip(folder / "CMU-1-Small-Region.geojson") >= 0.93
    # Without either, vectorising is exact: the GeoJSON burns back to the identical label map.
    exact = write_geojson(store.path, folder / "exact.geojson", min_area_um2=0, simplify_px=0)
    assert round_trip(exact) == 1.0

    with tifffile.TiffFile(folder / "CMU-1-Small-Region.labels.ome.tif") as tif:
        series = tif.series[0]
        assert len(series.levels) == store.n_levels
        np.testing.assert_array_equal(series.levels[0].asarray(), labels)
        assert 'PhysicalSizeX="1.0"' in tif.ome_metadata or 'PhysicalSizeX="1"' in tif.ome_metadata

    overlay = Image.open(folder / "CMU-1-Small-Region.overlay.png")
    assert overlay.mode in ("RGB", "RGBA") and min(overlay.size) > 100
    HTMLParser().feed((folder / "CMU-1-Small-Region.report.html").read_text())
