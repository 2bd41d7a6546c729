"""Synthetic sample slides: a real generic-TIFF pyramid both backends read, deterministic, H&E-like."""

from __future__ import annotations

import hashlib
import tracemalloc

import numpy as np
import openslide
import pytest
import tifffile
import tiffslide

from wsi_espnet.errors import ConfigError
from wsi_espnet.sample import write_sample_slide
from wsi_espnet.slide import Slide
from wsi_espnet.tissue import detect_tissue


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    return write_sample_slide(tmp_path_factory.mktemp("s") / "s.tif", 2500, 1800, mpp=0.25, seed=5)


def test_pyramid_structure_is_read_alike_by_both_backends(slide_path):
    with tifffile.TiffFile(slide_path) as tif:
        pages = list(tif.pages)
        assert [p.shape for p in pages] == [(1800, 2500, 3), (900, 1250, 3), (450, 625, 3)]
        assert all(p.is_tiled and p.compression == tifffile.COMPRESSION.JPEG for p in pages)
        assert [p.subfiletype for p in pages] == [0, 1, 1]  # top-level pages, not SubIFDs
        assert pages[0].tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        assert "SYNTHETIC" in pages[0].description
    by_openslide = openslide.OpenSlide(slide_path)
    by_tiffslide = tiffslide.TiffSlide(slide_path)
    for backend, prefix in ((by_openslide, "openslide"), (by_tiffslide, "tiffslide")):
        assert backend.level_count == 3
        assert backend.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert float(backend.properties[f"{prefix}.mpp-x"]) == pytest.approx(0.25)
    assert "SYNTHETIC" in by_openslide.properties["openslide.comment"]


def test_coarse_levels_show_the_same_picture_as_level_0(slide_path):
    """Levels are rendered from the same procedural content, not from level 0: they must agree."""
    backend = tiffslide.TiffSlide(slide_path)
    level0 = np.asarray(backend.read_region((0, 0), 0, (2500, 1800)), dtype=np.float32)
    level2 = np.asarray(backend.read_region((0, 0), 2, (625, 450)), dtype=np.float32)
    shrunk = level0.reshape(450, 4, 625, 4, 3).mean(axis=(1, 3))
    assert np.abs(shrunk - level2).mean() < 3
    assert np.corrcoef(shrunk.ravel(), level2.ravel())[0, 1] > 0.99


def test_same_seed_same_file_other_seed_other_slide(tmp_path):
    paths = [write_sample_slide(tmp_path / f"{i}.tif", 700, 500, seed=s) for i, s in enumerate((1, 1, 2))]
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert digests[0] == digests[1] != digests[2]


def test_colours_look_like_h_and_e(slide_path):
    with Slide.open(slide_path) as slide:
        tissue = detect_tissue(slide)
        pixels = slide.thumbnail(2.0)
        inside = tissue.region(0, 0, *pixels.shape[:2], 2.0)
    stained, glass = pixels[inside].astype(float), pixels[~inside].astype(float)
    red, green, blue = stained.mean(axis=0)
    assert red > blue > green  # eosin pink / haematoxylin purple: green is absorbed most
    assert glass.mean() > 235  # bright glass
    assert (stained.min(axis=1) < 120).mean() > 0.01  # dark purple nuclei exist


@pytest.mark.parametrize("fraction", [0.1, 0.6])
def test_tissue_fraction_is_controlled(tmp_path, fraction):
    measured = []
    for seed in (0, 1):
        path = write_sample_slide(tmp_path / f"{seed}.tif", 2048, 2048, tissue_fraction=fraction, seed=seed)
        with Slide.open(path) as slide:
            measured.append(detect_tissue(slide).mask.mean())
    assert np.mean(measured) == pytest.approx(fraction, abs=0.08)


def test_no_tissue_is_all_glass(tmp_path):
    path = write_sample_slide(tmp_path / "glass.tif", 600, 400, tissue_fraction=0.0)
    with Slide.open(path) as slide:
        assert slide.read_region(0, 0, 600, 400, 0.5).min() > 225


def _peak_bytes_writing(path, side: int) -> int:
    tracemalloc.start()
    try:
        write_sample_slide(path, side, side)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_flat(tmp_path):
    """Peak memory does not grow with the slide: 9x the pixels, (almost) the same peak."""
    small = _peak_bytes_writing(tmp_path / "small.tif", 1024)
    big = _peak_bytes_writing(tmp_path / "big.tif", 3072)
    assert big < 1.2 * small + 2**20
    assert big < 3072 * 3072 * 3  # less than level 0 itself


@pytest.mark.parametrize(
    "kwargs",
    [{"width": 0}, {"height": -1}, {"tissue_fraction": 1.5}, {"mpp": 0}],
)
def test_bad_arguments_raise_config_errors(tmp_path, kwargs):
    args = {"width": 256, "height": 256} | kwargs
    with pytest.raises(ConfigError):
        write_sample_slide(tmp_path / "x.tif", **args)
