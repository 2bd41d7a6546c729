"""The three kinds of work a Dask worker does for one slide: prepare, infer chunks, finalise.

Workers open the slide and read their own tiles: the client only ships small plans (paths,
chunk indices, the thumbnail-sized tissue mask), never pixels. User-facing problems (a corrupt
slide or tile, a missing mpp) are returned as :class:`~wsi_espnet.runstate.Failed` values rather
than raised, so Dask's retries are spent only on real infrastructure failures such as a lost worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import dask
import numpy as np
import torch
from distributed import get_worker

from wsi_espnet.config import InferenceSettings, OutputSettings, SegmentSettings
from wsi_espnet.errors import SlideError, WsiEspnetError
from wsi_espnet.export import export_all
from wsi_espnet.grid import Chunk, TileGrid
from wsi_espnet.models.cards import ModelCard, load_card, sha256_file
from wsi_espnet.outputs import ProgressLog, SlideOutput
from wsi_espnet.predict import Predictor, get_predictor
from wsi_espnet.runstate import Done, Failed, RunRecord, Skipped, SlideJob, SlidePlan
from wsi_espnet.slide import Slide
from wsi_espnet.stats import compute_statistics, write_statistics
from wsi_espnet.store import SlideStore
from wsi_espnet.tissue import TissueMask, detect_tissue

logger = logging.getLogger(__name__)

# Upsampling a slide more than this to reach the analysis resolution invents detail.
MAX_UPSAMPLING = 2.0


@lru_cache(maxsize=8)
def _cached_slide(path: str, slide_mpp: float) -> Slide:
    """One open slide per worker process and file: opening an SVS costs tens of milliseconds."""
    return Slide.open(path, slide_mpp=slide_mpp)


@lru_cache(maxsize=8)
def _cached_card(model: str) -> ModelCard:
    return load_card(model)


def _check_resolution(slide: Slide, mpp: float, shape: tuple[int, int]) -> None:
    if mpp * MAX_UPSAMPLING < slide.mpp:
        raise SlideError(
            f"analysis resolution {mpp} µm/px is more than {MAX_UPSAMPLING:g}x finer than the slide's "
            f"{slide.mpp:.3f} µm/px; choose a coarser --mpp",
            slide.path,
        )
    if min(shape) < 8:
        raise SlideError(
            f"--mpp {mpp} is too coarse for this slide: the analysis image would be only "
            f"{shape[1]}x{shape[0]} px",
            slide.path,
        )


@dataclass(frozen=True)
class _Opened:
    """What prepare learns from the slide file before closing it again."""

    grid: TileGrid
    mpp: float
    tissue: TissueMask
    metadata: dict[str, Any]
    tissue_seconds: float


def _open_slide(path: Path, slide_mpp: float | None, settings: SegmentSettings, card: ModelCard) -> _Opened:
    with Slide.open(path, slide_mpp=slide_mpp) as slide:
        mpp = settings.mpp or card.mpp
        grid = TileGrid(slide.analysis_shape(mpp), settings.tile, settings.halo)
        _check_resolution(slide, mpp, grid.shape)
        t0 = time.perf_counter()
        if settings.tissue_detection:
            tissue = detect_tissue(slide, settings.tissue)
        else:
            tissue = _everything(slide, settings.tissue.thumbnail_mpp)
        return _Opened(grid, mpp, tissue, slide.metadata(), time.perf_counter() - t0)


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
        selected = grid.select(opened.tissue, mpp) if settings.tissue_detection else grid.chunks
        store_params = _store_params(card, settings, mpp, grid)
        resumed = _open_or_create_store(
            output, store_params, settings.overwrite, _store_creator(card, opened)
        )
        done = ProgressLog(output.progress_dir).done()
        todo = [c.index for c in selected if c.index not in done]
        provenance = {
            "model": _model_record(card),
            "parameters": settings.as_record() | {"mpp": mpp, "slide_mpp": given_mpp},
            "slide_metadata": opened.metadata,
            "tiles": {
                "total": len(grid.chunks),
                "tissue": len(selected),
                "skipped_background": len(grid.chunks) - len(selected),
                "resumed_from_previous_run": len(selected) - len(todo),
            },
            "store_params": store_params,
        }
        timings = {"prepare_s": time.perf_counter() - start, "tissue_detection_s": opened.tissue_seconds}
        RunRecord.start(job, output, provenance).resumed(resumed, timings).write(output)
        slide_mpp = float(opened.metadata["mpp"])  # what the slide's file (or the override) says
        return SlidePlan(job, output, grid, mpp, slide_mpp, todo, opened.tissue, settings.tissue_detection)
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
        SlideStore.create(path, opened.grid, opened.mpp, card.classes, zarr_format, attrs)

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


def _read_windows(slide: Slide, grid: TileGrid, chunks: list[Chunk], mpp: float) -> np.ndarray:
    windows = []
    for chunk in chunks:
        y, x, h, w = grid.window(chunk)
        windows.append(slide.read_region(x, y, w, h, mpp))
    return np.stack(windows)


def _give_torch_the_worker_threads() -> None:
    """Let the network use all of this worker's threads.

    Dask's nanny starts workers with ``OMP_NUM_THREADS=1``, which pins PyTorch to one core
    whatever the worker was given (measured: 1.5x slower on 2 cores). One batch runs at a time
    behind the predictor's lock, so the worker's threads are free for the forward pass.
    """
    try:
        threads = get_worker().state.nthreads
    except ValueError:  # not inside a Dask worker
        return
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def infer_chunks(
    plan: SlidePlan, chunk_indices: list[tuple[int, int]], settings: InferenceSettings
) -> int | Failed:
    """Read, infer and write ``chunk_indices`` of one slide; record them as done. Returns count.

    The next mini-batch is read in a background thread while the current one is on the
    model, so disk and decode time hide behind compute. Each chunk is written exactly once,
    whole, by the only task that owns it: no locks and no read-modify-write. A tile the slide
    cannot deliver (a corrupt JPEG, a truncated file) is a :class:`Failed` value.
    """
    _give_torch_the_worker_threads()
    try:
        slide = _cached_slide(str(plan.job.path), plan.slide_mpp)
        predictor = get_predictor(_cached_card(settings.model), settings.device)
        _infer(
            plan,
            [plan.grid.chunk((int(iy), int(ix))) for iy, ix in chunk_indices],
            slide,
            predictor,
            settings,
        )
    except WsiEspnetError as exc:
        return Failed(plan.job, str(exc))
    first = chunk_indices[0]
    ProgressLog(plan.output.progress_dir).record(f"{first[0]}-{first[1]}-{len(chunk_indices)}", chunk_indices)
    return len(chunk_indices)


def _infer(
    plan: SlidePlan, chunks: list[Chunk], slide: Slide, predictor: Predictor, settings: InferenceSettings
) -> None:
    store = SlideStore.open(plan.output.store)
    grid, size = plan.grid, settings.batch_size
    batches = [chunks[i : i + size] for i in range(0, len(chunks), size)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tile-reader") as reader:
        pending = reader.submit(_read_windows, slide, grid, batches[0], plan.mpp)
        for k, batch in enumerate(batches):
            windows = pending.result()
            if k + 1 < len(batches):
                pending = reader.submit(_read_windows, slide, grid, batches[k + 1], plan.mpp)
            prediction = predictor.predict(windows, crop=grid.halo)
            for j, chunk in enumerate(batch):
                labels = prediction.labels[j, : chunk.h, : chunk.w]
                if plan.mask_labels:  # tissue at analysis resolution, from the whole window
                    y, x, _, _ = grid.window(chunk)
                    tissue = plan.tissue.refine(
                        windows[j],
                        y,
                        x,
                        plan.mpp,
                        (slice(grid.halo, grid.halo + chunk.h), slice(grid.halo, grid.halo + chunk.w)),
                    )
                    labels = np.where(tissue, labels, 0)
                store.write_chunk(chunk.index, prediction.scores[j, :, : chunk.h, : chunk.w], labels)


def finalise_slide(plan: SlidePlan, settings: OutputSettings, tiles_processed: list[int]) -> Done:
    """Pyramid, statistics, exports, then — last — the ``complete`` status in run.json and zarr.

    Runs on a worker. Dask calls inside it use the local threaded scheduler: a task must not
    block on the cluster it runs on.
    """
    timings: dict[str, float] = {}
    store = SlideStore.open(plan.output.store)
    with dask.config.set(scheduler="threads"):
        t0 = time.perf_counter()
        store.build_pyramid()
        timings["pyramid_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = compute_statistics(store, plan.tissue, plan.mpp / plan.slide_mpp)
        write_statistics(stats, plan.output.stats_json, plan.output.stats_csv)
        timings["statistics_s"] = time.perf_counter() - t0
    area = float(stats["tissue_area_mm2"])
    warnings = (f"{plan.job.path}: no tissue found; outputs are empty",) if area == 0 else ()
    processed = int(sum(tiles_processed))
    record = RunRecord.read(plan.output).finished(processed, timings, area)
    record.write(plan.output)
    t0 = time.perf_counter()
    if settings.formats:
        export_all(plan.output.root, settings=settings)
    timings = {**record.fields["timings"], "exports_s": time.perf_counter() - t0}
    store.set_status("complete")
    record.with_fields(timings=timings, warnings=list(warnings), status="complete").write(plan.output)
    return Done(plan.job, area, processed, warnings)


def run_finalise(plan: SlidePlan, settings: OutputSettings, *counts: int | Failed) -> Done | Failed:
    """Dask entry point: ``counts`` are the infer tasks' results, so this runs after all of them."""
    failures = [c for c in counts if isinstance(c, Failed)]
    if failures:
        return failures[0]
    try:
        return finalise_slide(plan, settings, list(counts))  # type: ignore[arg-type]
    except WsiEspnetError as exc:
        return Failed(plan.job, str(exc))
