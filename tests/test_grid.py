"""TileGrid: chunks tile the slide exactly once, windows batch, selection follows the tissue mask."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_espnet.grid import Chunk, TileGrid
from wsi_espnet.sample import write_sample_slide
from wsi_espnet.slide import Slide
from wsi_espnet.tissue import TissueMask, detect_tissue


def _mask(array: np.ndarray, mpp: float) -> TissueMask:
    return TissueMask(array.astype(bool), array.astype(np.int32), mpp)


def test_chunks_cover_the_slide_exactly_once():
    grid = TileGrid((1000, 700), tile=256, halo=32)
    cover = np.zeros(grid.shape, np.int32)
    for chunk in grid.chunks:
        cover[chunk.y0 : chunk.y0 + chunk.h, chunk.x0 : chunk.x0 + chunk.w] += 1
    assert (cover == 1).all()
    assert grid.grid_shape == (4, 3) and len(grid.chunks) == 12
    assert [c.index for c in grid.chunks[:4]] == [(0, 0), (0, 1), (0, 2), (1, 0)]  # row by row
    assert grid.chunk((3, 2)) == Chunk((3, 2), 768, 512, 232, 188)  # partial bottom-right chunk


def test_windows_are_one_size_and_centred_on_their_core():
    grid = TileGrid((1000, 700), tile=256, halo=32)
    for chunk in grid.chunks:
        y, x, h, w = grid.window(chunk)
        assert (h, w) == (320, 320)
        assert (y, x) == (chunk.y0 - 32, chunk.x0 - 32)


def test_slide_smaller_than_one_tile_is_one_partial_chunk():
    grid = TileGrid((90, 130), tile=512, halo=16)
    assert grid.chunks == [Chunk((0, 0), 0, 0, 90, 130)]
    assert grid.window(grid.chunks[0]) == (-16, -16, 544, 544)


@pytest.mark.parametrize(("analysis_mpp", "mask_mpp"), [(1.0, 16.0), (0.5, 8.0), (4.0, 2.0), (1.0, 3.0)])
def test_select_matches_the_mask_region_of_every_chunk(analysis_mpp, mask_mpp):
    """Same answer as resampling each core with TissueMask.region, at fine and coarse ratios."""
    rng = np.random.default_rng(int(analysis_mpp * 10 + mask_mpp))
    tissue = _mask(rng.random((40, 50)) > 0.97, mask_mpp)
    shape = (int(40 * mask_mpp / analysis_mpp) + 7, int(50 * mask_mpp / analysis_mpp) + 3)
    grid = TileGrid(shape, tile=16, halo=8)
    brute = [c for c in grid.chunks if tissue.region(c.y0, c.x0, c.h, c.w, analysis_mpp).any()]
    selected = grid.select(tissue, analysis_mpp)
    assert selected == brute
    assert 0 < len(selected) < len(grid.chunks)


def test_tissue_under_a_halo_only_does_not_select_the_chunk():
    mask = np.zeros((32, 32), bool)
    mask[5, 9] = True  # mask pixel 9 covers analysis columns 144..159: chunk column 2's core
    grid = TileGrid((512, 512), tile=64, halo=32)
    selected = grid.select(_mask(mask, 16.0), 1.0)
    assert [c.index for c in selected] == [(1, 2)]  # not (1, 1), whose halo reaches column 144


def test_empty_mask_selects_nothing():
    grid = TileGrid((300, 300), tile=128, halo=0)
    assert grid.select(_mask(np.zeros((20, 20)), 16.0), 1.0) == []


def test_selection_on_a_sample_slide_follows_its_tissue(tmp_path):
    path = write_sample_slide(tmp_path / "s.tif", 2048, 2048, mpp=0.5, tissue_fraction=0.2, seed=2)
    with Slide.open(path) as slide:
        tissue = detect_tissue(slide)
        grid = TileGrid(slide.analysis_shape(1.0), tile=128, halo=16)
        selected = grid.select(tissue, 1.0)

        def stained(chunks: list[Chunk]) -> float:
            """Share of stained (not glass) pixels in ``chunks`` at full analysis resolution."""
            reads = [slide.read_region(c.x0, c.y0, c.w, c.h, 1.0).min(axis=2) < 200 for c in chunks]
            return float(np.mean(np.concatenate([r.ravel() for r in reads])))

        in_selected = stained(selected)
        in_skipped = stained([c for c in grid.chunks if c not in selected])
    assert 0.2 <= len(selected) / len(grid.chunks) < 0.6  # tissue plus the chunks on its border
    assert in_skipped < 0.03 < 0.3 < in_selected  # what is skipped is (almost) all glass
