"""The infer task: run a slide's inference blocks and write each owned chunk once, whole.

A block is a rectangle of storage chunks plus the halo (see :mod:`wsi_espnet.blocks`); the
network runs once per block, so a 512-px chunk no longer pays for a 1024² window of its own.
Each chunk is still written exactly once, by the only block that owns it: no locks and no
read-modify-write. A block's chunks are recorded as done together, after all of them are on
disk, so a resumed run redoes whole blocks and gives the labels of an uninterrupted one.

User-facing problems (a tile the slide cannot deliver) come back as
:class:`~wsi_espnet.runstate.Failed` values, so Dask's retries go to real infrastructure failures.

The network's modules (torch, the predictor, the tiled reader) are imported when a task runs,
on the worker: ``segment``'s client imports this module to submit its tasks, and torch would
add seconds to every command's start-up and a few hundred MiB to the client.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from distributed import get_worker

from wsi_espnet.block_size import blocks_per_pass
from wsi_espnet.blocks import Block
from wsi_espnet.confidence import masked
from wsi_espnet.config import InferenceSettings
from wsi_espnet.errors import WsiEspnetError
from wsi_espnet.models.cards import ModelCard, load_card
from wsi_espnet.outputs import ProgressLog
from wsi_espnet.qc import apply_qc, artifact_map
from wsi_espnet.roi_regions import block_core
from wsi_espnet.runstate import Failed, SlidePlan
from wsi_espnet.slide import Slide
from wsi_espnet.store import SlideStore

if TYPE_CHECKING:
    from wsi_espnet.tiled import BlockOutput


@dataclass(frozen=True)
class Inferred:
    """What one infer task did: chunks written, seconds per stage (summed over its blocks), and
    when it ended (``time.time``: where a slide's post-inference wall time starts)."""

    chunks: int
    input_pixels: int
    read_s: float
    inference_s: float
    tissue_s: float
    write_s: float
    qc_s: float = 0.0
    ended: float = field(default_factory=time.time)


@lru_cache(maxsize=8)
def _cached_slide(path: str, slide_mpp: float) -> Slide:
    """One open slide per worker process and file: opening an SVS costs tens of milliseconds."""
    return Slide.open(path, slide_mpp=slide_mpp)


@lru_cache(maxsize=8)
def _cached_card(model: str) -> ModelCard:
    return load_card(model)


def _give_torch_the_worker_threads() -> None:
    """Let the network use all of this worker's threads.

    Dask's nanny starts workers with ``OMP_NUM_THREADS=1``, which pins PyTorch to one core
    whatever the worker was given (measured: 1.5x slower on 2 cores). One batch runs at a time
    behind the predictor's lock, so the worker's threads are free for the forward pass.
    """
    import torch

    try:
        threads = get_worker().state.nthreads
    except ValueError:  # not inside a Dask worker
        return
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def infer_task(plan: SlidePlan, blocks: list[Block], settings: InferenceSettings) -> Inferred | Failed:
    """Read, infer and write ``blocks`` of one slide; record each block's chunks as done."""
    from wsi_espnet.predict import get_predictor
    from wsi_espnet.tiled import RunOptions, StageTimes, infer_blocks, slide_reader

    _give_torch_the_worker_threads()
    try:
        slide = _cached_slide(str(plan.job.path), plan.slide_mpp)
        predictor = get_predictor(_cached_card(settings.model), settings.device)
        times = StageTimes()
        options = RunOptions(
            blocks_per_pass(predictor.device, settings.batch_size), plan.mask_labels, times, settings.tta
        )
        writer = _BlockWriter(plan)
        for output in infer_blocks(slide_reader(slide, plan.mpp), predictor, blocks, plan.grid, options):
            writer.write(output)
    except WsiEspnetError as exc:
        return Failed(plan.job, str(exc))
    chunks = sum(len(block.owned) for block in blocks)
    return Inferred(
        chunks,
        times.input_pixels,
        times.read_s,
        times.inference_s,
        writer.tissue_s,
        writer.write_s,
        writer.qc_s,
    )


class _BlockWriter:
    """Cuts a block's output into its chunks, masks glass, writes them and records the block."""

    def __init__(self, plan: SlidePlan) -> None:
        self.plan = plan
        self.store = SlideStore.open(plan.output.store)
        self.progress = ProgressLog(plan.output.progress_dir)
        self.tissue_s = 0.0
        self.write_s = 0.0
        self.qc_s = 0.0

    def write(self, output: BlockOutput) -> None:
        plan, grid, block = self.plan, self.plan.grid, output.block
        tissue = None
        core = tuple(slice(grid.halo, grid.halo + n * grid.tile) for n in (block.rows, block.cols))
        if plan.mask_labels:
            # Tissue versus glass at analysis resolution, from the pixels already read, once for
            # the whole block core: the halo around it gives the refinement context on every side.
            t0 = time.perf_counter()
            wy, wx, _, _ = block.window(grid)
            tissue = plan.tissue.refine(output.window, wy, wx, plan.mpp, core)
            self.tissue_s += time.perf_counter() - t0
        artifacts, excludes = None, False
        if plan.qc is not None:  # artifact QC from the same pixels, once per block core
            t0 = time.perf_counter()
            artifacts = artifact_map(output.window, plan.mpp, plan.qc.reference, plan.qc.settings, core)
            excludes = plan.qc.excludes
            self.qc_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        inside = None if plan.roi is None else plan.roi.mask(*block_core(block, grid))  # --roi
        for chunk, scores, labels in output.chunks(grid):
            confidence = output.chunk_confidence(grid, chunk)
            if tissue is not None:
                labels = np.where(tissue[block.core_slices(grid, chunk)], labels, 0)
            if inside is not None:
                labels = np.where(inside[block.core_slices(grid, chunk)], labels, 0)
            flagged = None
            if artifacts is not None:  # after the ROI: artifacts only on labelled tissue inside it
                labels, flagged = apply_qc(labels, artifacts[block.core_slices(grid, chunk)], excludes)
            if confidence is not None and (tissue is not None or inside is not None or excludes):
                confidence = masked(confidence, labels != 0)  # 0 = no prediction, as in unwritten chunks
            self.store.write_chunk(chunk.index, scores, labels, confidence=confidence, artifacts=flagged)
        self.write_s += time.perf_counter() - t0
        self.progress.record(f"{block.row0}-{block.col0}-{block.rows}x{block.cols}", block.owned)
