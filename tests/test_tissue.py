"""Tissue detection on real and constructed slides: plausible masks, artefacts excluded, µm settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsi_espnet.slide import Slide
from wsi_espnet.tissue import TissueSettings, detect_tissue

SVS = "wsi_aperio_cmu1_small_region/CMU-1-Small-Region.svs"
OME = "wsi_derived_pyramids/CMU-1-Small-Region.pyramid.ome.tif"
PINK, GLASS, DARK_INK = (225, 140, 190), (244, 243, 246), (10, 10, 30)


def _slide(path: Path, rgb: np.ndarray, mpp: float = 2.0) -> Path:
    """A tiled RGB TIFF at ``mpp`` µm/px: the smallest real slide file openslide accepts."""
    tifffile.imwrite(
        path, rgb, photometric="rgb", tile=(64, 64), resolution=(1e4 / mpp, 1e4 / mpp),
        resolutionunit="CENTIMETER", metadata=None,
    )  # fmt: skip
    return path


def _canvas(height: int = 1024, width: int = 1024) -> np.ndarray:
    return np.broadcast_to(np.array(GLASS, np.uint8), (height, width, 3)).copy()


def test_real_svs_has_a_plausible_mask(shared_data):
    with Slide.open(shared_data / SVS) as slide:
        tissue = detect_tissue(slide)
        assert tissue.mask.shape == slide.analysis_shape(16.0)
    assert tissue.mpp == 16.0 and tissue.mask.dtype == bool and tissue.fragments.dtype == np.int32
    assert 0.25 < tissue.mask.mean() < 0.5  # one strip of skin on glass (visually ~1/3 of the crop)
    assert tissue.n_fragments >= 1
    assert np.array_equal(tissue.fragments > 0, tissue.mask)


def test_same_tissue_from_the_svs_and_its_pyramid(shared_data):
    with Slide.open(shared_data / SVS) as svs, Slide.open(shared_data / OME) as ome:
        a = detect_tissue(svs, TissueSettings(thumbnail_mpp=8.0)).mask
        b = detect_tissue(ome, TissueSettings(thumbnail_mpp=8.0)).mask
    assert a.shape == b.shape
    assert (a & b).sum() / (a | b).sum() > 0.9


def test_all_glass_gives_an_empty_mask(tmp_path):
    with Slide.open(_slide(tmp_path / "glass.tif", _canvas())) as slide:
        tissue = detect_tissue(slide)
    assert not tissue.mask.any() and tissue.n_fragments == 0
    assert tissue.mask.shape == (128, 128)  # 1024 px at 2 µm/px seen at 16 µm/px


def test_fragments_are_labelled_and_dark_artefacts_and_specks_dropped(tmp_path):
    rgb = _canvas()
    rgb[100:400, 100:400] = PINK  # 600 µm square fragment
    rgb[600:900, 500:900] = PINK  # a second fragment
    rgb[500:520, 100:120] = PINK  # 40 µm speck: 1600 µm², far below min_object_um2
    rgb[700:900, 100:300] = DARK_INK  # saturated but nearly black: a pen mark, not tissue
    with Slide.open(_slide(tmp_path / "parts.tif", rgb)) as slide:
        tissue = detect_tissue(slide)
    assert tissue.n_fragments == 2
    assert set(np.unique(tissue.fragments)) == {0, 1, 2}
    ink = tissue.region(700, 100, 200, 200, 2.0)  # analysis grid at the slide's own 2 µm/px
    speck = tissue.region(500, 100, 20, 20, 2.0)
    first = tissue.region(150, 150, 200, 200, 2.0)
    assert not ink.any() and not speck.any() and first.all()
    assert tissue.mask.mean() == pytest.approx((300 * 300 + 300 * 400) / 1024**2, abs=0.02)


def test_small_holes_filled_large_holes_kept(tmp_path):
    rgb = _canvas()
    rgb[100:900, 100:900] = PINK
    rgb[200:240, 200:240] = GLASS  # 80 µm lumen: 6,400 µm² < min_hole_um2 → filled
    rgb[400:700, 400:700] = GLASS  # 600 µm hole: kept
    with Slide.open(_slide(tmp_path / "holes.tif", rgb)) as slide:
        tissue = detect_tissue(slide)
    assert tissue.region(200, 200, 40, 40, 2.0).all()
    assert not tissue.region(450, 450, 200, 200, 2.0).any()


def test_settings_are_in_micrometres(tmp_path):
    rgb = _canvas()
    rgb[300:700, 300:700] = PINK
    with Slide.open(_slide(tmp_path / "square.tif", rgb)) as slide:
        coarse = detect_tissue(slide)
        fine = detect_tissue(slide, TissueSettings(thumbnail_mpp=4.0))
        strict = detect_tissue(slide, TissueSettings(min_object_um2=1e6))  # > the 0.64 mm² square
    assert fine.mask.shape == (512, 512) and coarse.mask.shape == (128, 128)
    assert fine.mask.mean() == pytest.approx(coarse.mask.mean(), abs=0.01)  # same area, any thumbnail
    assert not strict.mask.any()
