"""The prepare task of one slide: open it, find its tissue, create or resume its store, plan blocks.

Workers open the slide and read their own tiles: the client only ships small plans (paths,
blocks of chunk indices, the thumbnail-sized tissue mask), never pixels. User-facing problems (a
corrupt slide, a missing mpp) are returned as :class:`~wsi_espnet.runstate.Failed` values rather
than raised, so Dask's retries are spent only on real infrastructure failures such as a lost worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_espnet.block_size import blocks_per_pass, choose_block_chunks
from wsi_espnet.blocks import Block, amplification, halo_union_floor, owned_chunks, plan_blocks
from wsi_espnet.config import SegmentSettings
from wsi_espnet.devices import resolve_device
from wsi_espnet.errors import WsiEspnetError
from wsi_espnet.grid import TileGrid
from wsi_espnet.models.cards import ModelCard, load_card, sha256_file
from wsi_espnet.outputs import ProgressLog, SlideOutput
from wsi_espnet.qc import SlideQc, qc_record, slide_qc
from wsi_espnet.roi import read_job_roi, write_normalised
from wsi_espnet.runstate import Failed, RunRecord, Skipped, SlideJob, SlidePlan
from wsi_espnet.slide import Slide, check_resolution
from wsi_espnet.store import SlideStore
from wsi_espnet.tissue import TissueMask, detect_tissue

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Opened:
    """What prepare learns from the slide file before closing it again."""

    grid: TileGrid
    mpp: float
    tissue: TissueMask
    metadata: dict[str, Any]
    tissue_seconds: float
    qc: SlideQc | None = None
    qc_seconds: float = 0.0


def _open_slide(path: Path, slide_mpp: float | None, settings: SegmentSettings, card: ModelCard) -> _Opened:
    with Slide.open(path, slide_mpp=slide_mpp) as slide:
        mpp = settings.mpp or card.mpp
        grid = TileGrid(slide.analysis_shape(mpp), settings.tile, settings.halo)
        check_resolution(slide, mpp)
        t0 = time.perf_counter()
        if settings.tissue_detection:
            tissue = detect_tissue(slide, settings.tissue)
        else:
            tissue = _everything(slide, settings.tissue.thumbnail_mpp)
        tissue_seconds = time.perf_counter() - t0
        qc = slide_qc(slide, tissue, mpp, settings.qc) if settings.qc != "off" else None
        qc_seconds = time.perf_counter() - t0 - tissue_seconds
        return _Opened(grid, mpp, tissue, slide.metadata(), tissue_seconds, qc, qc_seconds)


def prepare_slide(job: SlideJob, outdir: Path, settings: SegmentSettings) -> SlidePlan | Skipped | Failed:
    """Open the slide, detect tissue, create (or resume) the store, list the chunks to infer.

    Gets the whole settings because run.json records them all.
    """
    start = time.perf_counter()
    output = SlideOutput.for_slide(outdir, job.path)
    try:
        if not settings.overwrite and output.is_complete():
            area = ((output.read_run() or {}).get("statistics") or {}).get("tissue_area_mm2")
            return Skipped(job, area)
        card = load_card(settings.model)
        given_mpp = job.slide_mpp or settings.slide_mpp  # the job's override wins over the run's
        opened = _open_slide(job.path, given_mpp, settings, card)
        grid, mpp = opened.grid, opened.mpp
        tissue_chunks = grid.select(opened.tissue, mpp) if settings.tissue_detection else grid.chunks
        roi, regions = read_job_roi(job, settings, opened.metadata, grid, mpp)  # --roi
        selected = regions.select(tissue_chunks) if regions else tissue_chunks  # only chunks inside the ROI
        store_params = _store_params(card, settings, mpp, grid) | ({"roi": roi.sha256} if roi else {})
        resumed = _open_or_create_store(
            output, store_params, settings.overwrite, _store_creator(card, opened)
        )
        if roi is not None:
            write_normalised(roi, output.roi_geojson)  # what statistics and exports read the ROI from
        done = ProgressLog(output.progress_dir).done()
        k, source = _block_chunks(settings, grid, output if resumed else None)
        blocks = _pending_blocks([c.index for c in selected], grid, k, done)
        todo = owned_chunks(blocks)
        provenance = {
            "model": _model_record(card),
            "parameters": settings.as_record() | {"mpp": mpp, "slide_mpp": given_mpp},
            "slide_metadata": opened.metadata,
            "tiles": {
                "total": len(grid.chunks),
                "tissue": len(selected),
                "skipped_background": len(grid.chunks) - len(tissue_chunks),
                "resumed_from_previous_run": len(selected) - len(todo),
                **({"outside_roi": len(tissue_chunks) - len(selected)} if roi else {}),
            },
            "store_params": store_params,
            **({"roi": roi.record()} if roi else {}),
            "inference": _block_record(blocks, grid, (k, source), [c.index for c in selected]),
            "qc": qc_record(opened.qc),
        }
        timings = {"prepare_s": time.perf_counter() - start, "tissue_detection_s": opened.tissue_seconds}
        timings["qc_reference_s"] = opened.qc_seconds
        RunRecord.start(job, output, provenance).resumed(resumed, timings).write(output)
        slide_mpp = float(opened.metadata["mpp"])  # what the slide's file (or the override) says
        return SlidePlan(
            job,
            output,
            grid,
            mpp,
            slide_mpp,
            blocks,
            frozenset(done),
            SlideStore.open(output.store).n_levels,
            opened.tissue,
            settings.tissue_detection,
            regions,
            opened.qc,
        )
    except WsiEspnetError as exc:
        return Failed(job, str(exc))


def _everything(slide: Slide, mpp: float) -> TissueMask:
    """A mask that covers the whole slide (``--no-tissue-detection``): one fragment."""
    h, w = slide.analysis_shape(mpp)
    return TissueMask(np.ones((h, w), bool), np.ones((h, w), np.int32), mpp)


def _model_record(card: ModelCard) -> dict[str, Any]:
    return {
        "name": card.name,
        "card": str(card.path),
        "card_sha256": sha256_file(card.path),
        "weights_sha256": card.weights_sha256,
        "trained": card.trained,
        "description": card.description,
        # The card's own leave-one-out figures, so the report states how far to trust the model.
        "evaluation": {
            key: value for key, value in (card.extra.get("training") or {}).items() if key.startswith("loo_")
        },
        "classes": card.class_table(),
    }


def _store_params(card: ModelCard, settings: SegmentSettings, mpp: float, grid: TileGrid) -> dict:
    """What a partial store must have been made with for this run to resume it."""
    return {
        "model": card.weights_sha256 or card.name,
        "mpp": mpp,
        "tile": grid.tile,
        "halo": grid.halo,
        "shape": list(grid.shape),
        "zarr_format": settings.zarr_format,
        "tissue_detection": settings.tissue_detection,
        "tta": settings.tta,  # changes the scores, labels and confidence of every chunk
        "qc": settings.qc,  # exclude changes the labels, flag adds a layer
    }


def _store_creator(card: ModelCard, opened: _Opened) -> Callable[[Path, int], None]:
    """A function that creates the empty store at a path in a zarr format, once it is needed."""
    meta = opened.metadata
    slide_block = {
        "path": str(meta.get("path")),
        "mpp": float(meta["mpp"]),
        "dimensions": list(meta["dimensions"]),
        "bounds_offset": list(meta.get("bounds_offset", (0, 0))),
    }
    model = {"name": card.name, "sha256": card.weights_sha256 or ""}

    def create(path: Path, zarr_format: int) -> None:
        attrs = {"model": model, "slide": slide_block}
        qc = opened.qc.mode if opened.qc is not None else "off"
        SlideStore.create(path, opened.grid, opened.mpp, card.classes, zarr_format, {**attrs, "qc": qc})

    return create


def _open_or_create_store(
    output: SlideOutput, params: dict[str, Any], overwrite: bool, create: Callable[[Path, int], None]
) -> bool:
    """Resume a partial store made with the same ``params`` (True); otherwise start afresh (False).

    Only now, with the slide and model known to be usable, is an old output removed: a bad
    input never destroys results that were already there.
    """
    previous = None if overwrite else output.read_run()
    if previous is not None and previous.get("store_params") == params and output.store.is_dir():
        SlideStore.open(output.store)  # checks it is a readable wsi-espnet store
        return True
    if output.root.exists():
        if previous is not None:
            logger.warning("%s: partial output made with other parameters; starting again", output.root)
        output.clear()
    output.root.mkdir(parents=True, exist_ok=True)
    create(output.store, params["zarr_format"])
    return False


def _block_chunks(settings: SegmentSettings, grid: TileGrid, resumed: SlideOutput | None) -> tuple[int, str]:
    """Chunks per block side, and where the figure came from (recorded in run.json).

    ``--block`` wins. A resumed slide keeps the block of the run it resumes, so its labels are
    those of an uninterrupted run. Otherwise the device decides (:func:`choose_block_chunks`).
    """
    if settings.block is not None:
        return settings.block // grid.tile, "--block"  # validated: a multiple of the tile
    previous = ((resumed.read_run() or {}).get("inference") or {}) if resumed is not None else {}
    if isinstance(previous.get("block_chunks"), int):
        return previous["block_chunks"], "resumed run"
    device = resolve_device(settings.device)
    batch = blocks_per_pass(device, settings.batch_size)
    return choose_block_chunks(device, batch, grid.tile, grid.halo), f"{device.type} memory"


def _pending_blocks(
    selected: list[tuple[int, int]], grid: TileGrid, k: int, done: set[tuple[int, int]]
) -> tuple[Block, ...]:
    """Blocks still to infer: the plan over *all* selected chunks, less the blocks already done.

    Planning over every selected chunk (not just the missing ones) makes a resumed run infer the
    same windows as an uninterrupted one. Chunks done in another layout (an older run) are kept,
    and the rest of such a block is planned again on its own.
    """
    blocks, stray = [], []
    for block in plan_blocks(selected, grid, k):
        finished = [index for index in block.owned if index in done]
        if not finished:
            blocks.append(block)
        elif len(finished) < len(block.owned):
            stray.extend(index for index in block.owned if index not in done)
    if stray:
        blocks.extend(plan_blocks(stray, grid, k))
    return tuple(blocks)


def _block_record(
    blocks: tuple[Block, ...], grid: TileGrid, choice: tuple[int, str], selected: list[tuple[int, int]]
) -> dict[str, Any]:
    """How the network's work was laid out, for run.json and the benchmarks."""
    k, source = choice
    return {
        "block_chunks": k,
        "block_px": k * grid.tile,
        "block_source": source,
        "blocks": len(blocks),
        "input_pixels": sum(block.input_pixels(grid) for block in blocks),
        "amplification": amplification(list(blocks), grid) if blocks else None,
        "halo_union_floor": halo_union_floor(selected, grid) if selected else None,
    }
