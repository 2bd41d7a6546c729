"""Running inference blocks: read each block's window, predict once, cut out its owned chunks.

This is the one tiled-inference path. ``segment`` feeds it windows read from a slide;
``evaluate`` and train-time validation feed it an image in memory through :func:`infer_image`,
with the same grid, halo, block plan and white padding, so that what is scored is what users run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from wsi_espnet.block_size import choose_block_chunks
from wsi_espnet.blocks import Block, plan_blocks
from wsi_espnet.grid import Chunk, TileGrid
from wsi_espnet.predict import Prediction, Predictor
from wsi_espnet.slide import Slide

# (y, x, height, width) in analysis pixels → RGB uint8 (height, width, 3); white outside the image,
# the contract of Slide.read_region (whose argument order is x, y, width, height).
ReadWindow = Callable[[int, int, int, int], np.ndarray]
ChunkPrediction = tuple[Chunk, np.ndarray, np.ndarray]  # chunk, scores (C, h, w), labels (h, w)

WHITE = 255


def batch_blocks(blocks: list[Block], grid: TileGrid, batch_size: int) -> list[list[Block]]:
    """Blocks in batches of at most ``batch_size`` that share one window shape (a batch is one
    tensor). Shapes keep the order in which they first occur; so do blocks within a shape."""
    by_shape: dict[tuple[int, int], list[Block]] = {}
    for block in blocks:
        by_shape.setdefault(block.window(grid)[2:], []).append(block)
    size = max(batch_size, 1)
    return [same[i : i + size] for same in by_shape.values() for i in range(0, len(same), size)]


@dataclass
class StageTimes:
    """Seconds spent reading windows and in the network, summed over the blocks of a task.

    Reading runs in a background thread, overlapped with the network, so the two may add up to
    more than the task's wall time; both are what run.json reports per stage.
    """

    read_s: float = 0.0
    inference_s: float = 0.0
    input_pixels: int = 0


@dataclass(frozen=True)
class BlockOutput:
    """One block's network input and its halo-cropped output (scores (C, h, w), labels (h, w),
    confidence (h, w))."""

    block: Block
    window: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray | None = None

    def chunks(self, grid: TileGrid) -> Iterator[ChunkPrediction]:
        """(chunk, scores, labels) of each owned chunk: views, clipped to the slide at its edges."""
        for index in self.block.owned:
            chunk = grid.chunk(index)
            ys, xs = self.block.core_slices(grid, chunk)
            yield chunk, self.scores[:, ys, xs], self.labels[ys, xs]

    def chunk_confidence(self, grid: TileGrid, chunk: Chunk) -> np.ndarray | None:
        """The confidence (h, w) of one owned ``chunk`` (a view), None when not computed."""
        if self.confidence is None:
            return None
        return self.confidence[self.block.core_slices(grid, chunk)]


def _read_batch(read_window: ReadWindow, grid: TileGrid, batch: list[Block], times: StageTimes) -> np.ndarray:
    t0 = time.perf_counter()
    windows = np.stack([read_window(*block.window(grid)) for block in batch])
    times.read_s += time.perf_counter() - t0
    return windows


def infer_blocks(
    read_window: ReadWindow,
    predictor: Predictor,
    blocks: list[Block],
    grid: TileGrid,
    options: RunOptions | None = None,
) -> Iterator[BlockOutput]:
    """Each block's input window and output, block by block (one forward pass per batch).

    The next batch is read in a background thread while the current one is on the model, so
    disk and decode time hide behind compute. The halo is cropped inside the predictor (before
    the softmax).
    """
    options = options or RunOptions()
    times = options.times if options.times is not None else StageTimes()
    batches = batch_blocks(blocks, grid, options.batch_size)
    if not batches:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-reader") as reader:
        pending = reader.submit(_read_batch, read_window, grid, batches[0], times)
        for k, batch in enumerate(batches):
            windows = pending.result()
            if k + 1 < len(batches):
                pending = reader.submit(_read_batch, read_window, grid, batches[k + 1], times)
            t0 = time.perf_counter()
            prediction = predictor.predict(
                windows, crop=grid.halo, tissue_only=options.tissue_only, tta=options.tta
            )
            times.inference_s += time.perf_counter() - t0
            times.input_pixels += windows.shape[0] * windows.shape[1] * windows.shape[2]
            for j, block in enumerate(batch):
                confidence = None if prediction.confidence is None else prediction.confidence[j]
                yield BlockOutput(block, windows[j], prediction.scores[j], prediction.labels[j], confidence)


@dataclass(frozen=True)
class RunOptions:
    """How :func:`infer_blocks` runs: blocks per forward pass, tissue-only labels, a timer, and
    the number of test-time augmentation views (:mod:`wsi_espnet.tta`)."""

    batch_size: int = 1
    tissue_only: bool = False
    times: StageTimes | None = None
    tta: int = 1


def image_reader(image: np.ndarray) -> ReadWindow:
    """A :data:`ReadWindow` over an RGB image in memory: white outside it, as on a slide."""
    height, width = image.shape[:2]

    def read(y: int, x: int, h: int, w: int) -> np.ndarray:
        out = np.full((h, w, 3), WHITE, np.uint8)
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, height), min(x + w, width)
        if y1 > y0 and x1 > x0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = image[y0:y1, x0:x1]
        return out

    return read


def slide_reader(slide: Slide, mpp: float) -> ReadWindow:
    """A :data:`ReadWindow` over ``slide`` at analysis resolution ``mpp`` (white outside it)."""
    return lambda y, x, h, w: slide.read_region(x, y, w, h, mpp)


def infer_image(
    image: np.ndarray,
    predictor: Predictor,
    tile: int = 512,
    halo: int = 256,
    block_chunks: int | None = None,
    options: RunOptions | None = None,
) -> Prediction:
    """Scores (C, H, W), labels and confidence (H, W) of a whole RGB image, tiled exactly as
    ``segment`` tiles a slide with ``--no-tissue-detection``: the same grid, halo, block plan
    and white margin.

    ``block_chunks`` defaults to what :func:`choose_block_chunks` picks for the predictor's
    device at batch 1, as ``segment`` does; pass ``segment``'s ``--block`` choice to match a run
    made with it. ``options`` passes ``tta`` (and ``tissue_only``) through to the predictor.
    """
    image = np.asarray(image, dtype=np.uint8)
    grid = TileGrid(image.shape[:2], tile, halo)
    k = block_chunks or choose_block_chunks(predictor.device, 1, tile, halo)
    blocks = plan_blocks(grid.chunks, grid, k)
    scores: np.ndarray | None = None  # its class count is the network's, known from the first block
    labels = np.empty(grid.shape, np.uint8)
    confidence = np.zeros(grid.shape, np.uint8)
    for out in infer_blocks(image_reader(image), predictor, blocks, grid, options):
        for chunk, chunk_scores, chunk_labels in out.chunks(grid):
            if scores is None:
                scores = np.empty((chunk_scores.shape[0], *grid.shape), np.uint8)
            box = slice(chunk.y0, chunk.y0 + chunk.h), slice(chunk.x0, chunk.x0 + chunk.w)
            scores[(slice(None), *box)] = chunk_scores
            labels[box] = chunk_labels
            confidence[box] = out.chunk_confidence(grid, chunk)
    assert scores is not None  # a grid has at least one chunk
    return Prediction(scores, labels, confidence)
