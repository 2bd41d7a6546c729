"""Block inference on real pixels with the real model: a block agrees with one window over the
same region and with the chunk-by-chunk path, and infer_image is segment's geometry exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_espnet.blocks import Block, plan_blocks
from wsi_espnet.grid import TileGrid
from wsi_espnet.models.cards import load_card
from wsi_espnet.predict import Predictor
from wsi_espnet.slide import Slide
from wsi_espnet.tiled import (
    RunOptions,
    StageTimes,
    batch_blocks,
    image_reader,
    infer_blocks,
    infer_image,
    slide_reader,
)

CMU1 = "wsi_aperio_cmu1_small_region/CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def predictor(tissue_card: Path) -> Predictor:
    return Predictor(load_card(tissue_card), "cpu")


@pytest.fixture(scope="module")
def cmu1(shared_data: Path):
    with Slide.open(shared_data / CMU1) as slide:
        yield slide


def _chunk_path(slide: Slide, predictor: Predictor, grid: TileGrid, indices, mpp: float) -> dict:
    """Labels of each chunk from its own window, as segment inferred chunks before blocks."""
    out = {}
    for index in indices:
        chunk = grid.chunk(index)
        y, x, h, w = grid.window(chunk)
        window = np.stack([slide.read_region(x, y, w, h, mpp)])
        prediction = predictor.predict(window, crop=grid.halo)
        core = slice(0, chunk.h), slice(0, chunk.w)
        out[index] = (prediction.scores[0][(slice(None), *core)], prediction.labels[0][core])
    return out


def test_block_agrees_with_one_window_and_with_chunks(cmu1: Slide, predictor: Predictor) -> None:
    grid = TileGrid(cmu1.analysis_shape(1.0), 64, 256)  # segment's halo; small chunks keep it quick
    owned = ((10, 8), (10, 9), (11, 8), (11, 9))  # 2 x 2 chunks inside the tissue
    block = Block(10, 8, 2, 2, owned)
    read = slide_reader(cmu1, 1.0)
    times = StageTimes()
    (output,) = infer_blocks(read, predictor, [block], grid, RunOptions(times=times))
    got = {chunk.index: (s, lab) for chunk, s, lab in output.chunks(grid)}
    assert sorted(got) == sorted(owned)
    assert output.window.shape == (2 * 64 + 512, 2 * 64 + 512, 3)
    assert times.input_pixels == 640 * 640 and times.inference_s > 0 and times.read_s > 0
    # The block's core is analysis rows 640-768, columns 512-640. One window over that region
    # equal to the block's window sees the very same pixels; one with more context (384 px a
    # side) agrees to within seams.
    same = predictor.predict(np.stack([read(*block.window(grid))]), crop=256)
    wider = predictor.predict(np.stack([read(640 - 384, 512 - 384, 896, 896)]), crop=384).labels[0]
    chunks = _chunk_path(cmu1, predictor, grid, owned, 1.0)
    agree_wider, agree_chunks = [], []
    for (row, col), (scores, labels) in got.items():
        y, x = (row - 10) * 64, (col - 8) * 64
        assert np.array_equal(labels, same.labels[0, y : y + 64, x : x + 64])
        assert np.array_equal(scores, same.scores[0, :, y : y + 64, x : x + 64])
        agree_wider.append(np.mean(labels == wider[y : y + 64, x : x + 64]))
        agree_chunks.append(np.mean(labels == chunks[(row, col)][1]))
    assert np.mean(agree_wider) >= 0.999, agree_wider
    assert np.mean(agree_chunks) >= 0.999, agree_chunks


def test_infer_image_is_the_chunk_path(cmu1: Slide, predictor: Predictor) -> None:
    """The in-memory path (evaluate, validation) against windows read from the slide (segment):
    identical with one chunk per block, and identical to slide-read blocks with larger ones."""
    mpp = 4.0  # a coarse read keeps the test quick; the geometry is what is checked
    shape = cmu1.analysis_shape(mpp)
    image = cmu1.read_region(0, 0, shape[1], shape[0], mpp)
    grid = TileGrid(shape, 128, 64)
    assert grid.grid_shape == (3, 3) and shape[0] % 128 and shape[1] % 128  # partial edge chunks
    chunks = _chunk_path(cmu1, predictor, grid, [c.index for c in grid.chunks], mpp)
    single = infer_image(image, predictor, 128, 64, block_chunks=1)
    for chunk in grid.chunks:
        box = slice(chunk.y0, chunk.y0 + chunk.h), slice(chunk.x0, chunk.x0 + chunk.w)
        assert np.array_equal(single.labels[box], chunks[chunk.index][1])
        assert np.array_equal(single.scores[(slice(None), *box)], chunks[chunk.index][0])
    blocks = plan_blocks(grid.chunks, grid, 2)
    assert {(b.rows, b.cols) for b in blocks} != {(1, 1)}
    blocked = infer_image(image, predictor, 128, 64, block_chunks=2)
    from_slide = np.zeros(shape, np.uint8)
    outputs = infer_blocks(slide_reader(cmu1, mpp), predictor, blocks, grid, RunOptions(batch_size=2))
    for chunk, _, labels in (c for out in outputs for c in out.chunks(grid)):
        from_slide[chunk.y0 : chunk.y0 + chunk.h, chunk.x0 : chunk.x0 + chunk.w] = labels
    assert np.array_equal(blocked.labels, from_slide)
    assert blocked.scores.shape == (predictor.card.n_classes, *shape)


def test_image_reader_pads_with_white_and_batches_share_a_shape() -> None:
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    window = image_reader(image)(-1, 3, 3, 4)
    assert window.shape == (3, 4, 3)
    assert (window[0] == 255).all() and (window[:, 2:] == 255).all()
    assert np.array_equal(window[1:, :2], image[:2, 3:5])
    grid = TileGrid((4096, 4096), 512, 256)
    blocks = [Block(0, 0, 1, 1, ((0, 0),)), Block(0, 2, 2, 1, ((0, 2),)), Block(4, 4, 1, 1, ((4, 4),))]
    batches = batch_blocks(blocks, grid, batch_size=4)
    assert [[b.col0 for b in batch] for batch in batches] == [[0, 4], [2]]
    assert all(len({b.window(grid)[2:] for b in batch}) == 1 for batch in batches)
