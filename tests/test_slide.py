"""Slide: backend choice, mpp resolution, region reads at any mpp, and clear errors for bad files."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from wsi_espnet.errors import SlideError
from wsi_espnet.sample import write_sample_slide
from wsi_espnet.slide import Slide, find_slides, open_slide

SVS = "wsi_aperio_cmu1_small_region/CMU-1-Small-Region.svs"
PYRAMID = "wsi_derived_pyramids/CMU-1-Small-Region.pyramid.tif"
OME = "wsi_derived_pyramids/CMU-1-Small-Region.pyramid.ome.tif"


def _write_tiff(path: Path, rgb: np.ndarray, resolution: tuple | None = None, tile: int | None = 64) -> Path:
    """A single-level RGB TIFF (tiled unless ``tile`` is None) with optional resolution tags."""
    kwargs = {} if resolution is None else {"resolution": resolution[:2], "resolutionunit": resolution[2]}
    tifffile.imwrite(
        path, rgb, photometric="rgb", tile=None if tile is None else (tile, tile), metadata=None, **kwargs
    )
    return path


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    return write_sample_slide(tmp_path_factory.mktemp("s") / "sample.tif", 1500, 1100, mpp=0.5, seed=1)


@pytest.mark.parametrize(
    ("name", "backend", "levels", "vendor"),
    [(SVS, "openslide", 1, "aperio"), (PYRAMID, "openslide", 4, "generic-tiff"), (OME, "tiffslide", 4, None)],
)
def test_real_slides_open_with_the_right_backend(shared_data, name, backend, levels, vendor):
    with Slide.open(shared_data / name) as slide:
        assert slide.backend == backend
        assert len(slide.level_downsamples) == levels
        assert slide.vendor == vendor
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.analysis_shape(1.0) == (1481, 1108)  # ceil(2967 / 2.004), ceil(2220 / 2.004)
        meta = json.loads(json.dumps(slide.metadata()))
    assert meta["backend"] == backend and meta["level_count"] == levels
    assert meta["mpp"] == pytest.approx(0.499) and meta["bounds_offset"] == [0, 0]
    assert meta["objective_power"] == (20.0 if name == SVS else None)


@pytest.mark.parametrize("name", [PYRAMID, OME])
def test_pyramid_read_at_1um_uses_level_1_and_matches_the_svs(shared_data, name):
    with Slide.open(shared_data / SVS) as svs, Slide.open(shared_data / name) as pyramid:
        assert pyramid.best_level(1.0) == 1 and pyramid.level_downsamples[1] == pytest.approx(2.0, abs=0.01)
        assert pyramid.best_level(0.499) == 0 and pyramid.best_level(4.2) == 3
        expected = svs.read_region(300, 500, 256, 256, 1.0).astype(float)
        got = pyramid.read_region(300, 500, 256, 256, 1.0).astype(float)
    assert got.shape == (256, 256, 3) and got.dtype == float
    assert expected.std() > 20  # the window holds tissue, so the comparison means something
    # Pixel noise from different resamplers (LANCZOS pyramid vs BOX) and re-encoding as JPEG, but
    # the same picture: colours agree over 16-px blocks and pixels correlate closely.
    assert np.abs(got - expected).mean() < 8
    blocks = np.abs((got - expected).reshape(16, 16, 16, 16, 3).mean(axis=(1, 3)))
    assert blocks.mean() < 1.5
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.97


@pytest.mark.parametrize("name", [SVS, OME])
def test_window_past_the_edges_is_padded_white_identically(shared_data, name):
    with Slide.open(shared_data / name) as slide:
        height, width = slide.analysis_shape(1.0)
        big = slide.read_region(-40, -30, 256, 256, 1.0)
        small = slide.read_region(-40, -30, 96, 64, 1.0)
        corner = slide.read_region(width - 100, height - 60, 256, 256, 1.0)
        outside = slide.read_region(width + 10, 5, 32, 32, 1.0)
    assert (big[:30] == 255).all() and (big[:, :40] == 255).all()
    assert big[30:, 40:].min() < 200  # real pixels start right at the slide edge
    assert np.abs(big[:64, :96].astype(int) - small).max() <= 1  # same pixels whatever the window
    assert (corner[60:] == 255).all() and (corner[:, 100:] == 255).all()
    assert (outside == 255).all()


@pytest.mark.parametrize(("name", "mean_tol", "max_tol"), [(OME, 0.01, 1), (PYRAMID, 0.5, 12)])
def test_adjacent_windows_agree_with_one_big_read(shared_data, name, mean_tol, max_tol):
    """Tiles read separately match one big read: a pixel's value does not depend on its window.

    tiffslide reads whole level pixels, so only float rounding differs. openslide positions a
    read at a fractional level pixel and resamples to get there (non-integer downsample
    2.0003), so reads starting at different places differ by a slight blur.
    """
    with Slide.open(shared_data / name) as slide:
        whole = slide.read_region(100, 200, 256, 128, 1.0).astype(int)
        left = slide.read_region(100, 200, 128, 128, 1.0)
        right = slide.read_region(228, 200, 128, 128, 1.0)
    diff = np.abs(np.concatenate([left, right], axis=1) - whole)
    assert diff.mean() < mean_tol and diff.max() <= max_tol


def test_thumbnail_has_the_analysis_shape(shared_data):
    with Slide.open(shared_data / SVS) as slide:
        thumb = slide.thumbnail(16.0)
        assert thumb.shape == (*slide.analysis_shape(16.0), 3) and thumb.dtype == np.uint8
        assert thumb.min() < 150 and thumb.max() > 230  # tissue and glass both visible


def test_upsampling_finer_than_level_0(shared_data):
    with Slide.open(shared_data / SVS) as slide:
        region = slide.read_region(0, 0, 200, 100, 0.25)
    assert region.shape == (100, 200, 3)


def test_concurrent_reads_match_sequential_reads(shared_data):
    for name in (PYRAMID, OME):  # openslide (lock-free) and tiffslide (locked)
        with Slide.open(shared_data / name) as slide:
            boxes = [(x, y, 192, 192, 1.0) for x in range(0, 900, 150) for y in range(0, 1200, 300)]
            sequential = [slide.read_region(*b) for b in boxes]
            with ThreadPoolExecutor(4) as pool:
                parallel = list(pool.map(lambda b: slide.read_region(*b), boxes))
        assert all(np.array_equal(a, b) for a, b in zip(sequential, parallel, strict=True))


def test_sample_slides_open_with_both_backends(sample):
    ome = sample.with_name("sample.ome.tif")
    shutil.copy(sample, ome)
    with open_slide(sample) as a, open_slide(ome) as b:
        assert (a.backend, b.backend) == ("openslide", "tiffslide")
        for slide in (a, b):
            assert slide.mpp == pytest.approx(0.5)
            assert slide.level_downsamples == pytest.approx((1.0, 2.0))
        via_openslide = a.read_region(0, 0, 375, 275, 2.0).astype(int)
        assert np.abs(via_openslide - b.read_region(0, 0, 375, 275, 2.0)).max() <= 2


def test_mpp_from_tiff_tags_in_inches_and_the_override(tmp_path):
    rgb = np.full((200, 300, 3), 200, np.uint8)
    inch = _write_tiff(tmp_path / "inch.tif", rgb, (25400 / 0.25, 25400 / 0.25, "INCH"))
    with Slide.open(inch) as slide:
        assert slide.mpp == pytest.approx(0.25)
    with Slide.open(inch, slide_mpp=0.5) as slide:
        assert slide.mpp == 0.5 and slide.mpp_source == "--slide-mpp"


def test_openslide_falls_back_to_tiffslide_for_a_stripped_tiff(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    path = _write_tiff(tmp_path / "stripped.tif", rgb, (1e4 / 0.5, 1e4 / 0.5, "CENTIMETER"), tile=None)
    with Slide.open(path) as slide:
        assert slide.backend == "tiffslide" and slide.mpp == pytest.approx(0.5)
        assert np.array_equal(slide.read_region(0, 0, 160, 120, 0.5), rgb)


@pytest.mark.parametrize("resolution", [None, (72, 72, "INCH")])  # no tags; a 72-dpi software default
def test_slide_without_usable_mpp_asks_for_slide_mpp(tmp_path, resolution):
    path = _write_tiff(tmp_path / "nompp.tif", np.full((128, 128, 3), 90, np.uint8), resolution)
    with pytest.raises(SlideError, match=r"nompp\.tif.*--slide-mpp"):
        Slide.open(path)
    with Slide.open(path, slide_mpp=0.3) as slide:
        assert slide.mpp == 0.3


def test_bad_inputs_raise_slide_errors_naming_the_file(tmp_path, sample):
    png = tmp_path / "photo.svs"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png, format="PNG")
    text = tmp_path / "notes.svs"
    text.write_text("not a slide")
    empty = tmp_path / "empty.tif"
    empty.touch()
    truncated = tmp_path / "truncated.tif"
    data = sample.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    cases = {
        tmp_path / "missing.svs": "no such file",
        tmp_path: "folder without DICOM files",
        png: "not a readable whole-slide image",
        text: "not a readable whole-slide image",
        empty: "empty",
        truncated: "truncated",
    }
    for path, message in cases.items():
        with pytest.raises(SlideError, match=message) as info:
            Slide.open(path)
        assert str(path) in str(info.value)
    with pytest.raises(SlideError, match="--slide-mpp must be a positive"):
        Slide.open(sample, slide_mpp=-1)


def test_find_slides_expands_folders(tmp_path, sample):
    folder = tmp_path / "cohort"
    folder.mkdir()
    for name in ("b.svs", "a.ome.tif", "c.ndpi"):
        (folder / name).write_bytes(b"x")
    (folder / "notes.txt").write_text("ignored")
    found = find_slides([folder, sample, sample])
    assert found == [folder / "a.ome.tif", folder / "b.svs", folder / "c.ndpi", sample]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SlideError, match="no slides"):
        find_slides([empty])
    with pytest.raises(SlideError, match="no such file"):
        find_slides([tmp_path / "nope"])
