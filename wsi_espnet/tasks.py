"""The three kinds of work a Dask worker does for one slide: prepare, infer chunks, finalise.

Workers open the slide and read their own tiles: the client only ships small plans (paths,
chunk indices, the thumbnail-sized tissue mask), never pixels. User-facing problems (a corrupt
slide, a missing mpp) are returned as :class:`SlideFailure` values rather than raised, so Dask's
retries are spent only on real infrastructure failures such as a lost worker.
"""

from __future__ import annotations

import logging
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from distributed import get_worker

from wsi_espnet import __version__
from wsi_espnet.config import SegmentSettings
from wsi_espnet.errors import SlideError, WsiEspnetError
from wsi_espnet.grid import Chunk, TileGrid
from wsi_espnet.models.cards import ModelCard, load_card, sha256_file
from wsi_espnet.outputs import SlideOutput
from wsi_espnet.predict import get_predictor
from wsi_espnet.slide import Slide
from wsi_espnet.store import ProgressLog, SlideStore
from wsi_espnet.tissue import TissueMask, detect_tissue

logger = logging.getLogger(__name__)

# Upsampling a slide more than this to reach the analysis resolution invents detail.
MAX_UPSAMPLING = 2.0
LIBRARIES = ("torch", "numpy", "dask", "distributed", "zarr", "tifffile", "openslide-python", "tiffslide")


@dataclass(frozen=True)
class SlideJob:
    """One slide to segment, with an optional per-slide resolution override."""

    path: Path
    slide_mpp: float | None = None


@dataclass
class SlideFailure:
    """A slide that cannot be processed, and why (one line, naming the file)."""

    job: SlideJob
    error: str


@dataclass
class SlidePlan:
    """What the client needs to schedule one slide's chunks (small: no pixels but the mask)."""

    job: SlideJob
    output: SlideOutput
    shape: tuple[int, int]
    mpp: float
    slide_mpp: float
    todo: list[tuple[int, int]]
    n_chunks: int
    n_tissue_chunks: int
    n_done_before: int
    tissue: TissueMask
    record: dict[str, Any]
    skipped: bool = False
    timings: dict[str, float] = field(default_factory=dict)


@lru_cache(maxsize=8)
def _cached_slide(path: str, slide_mpp: float | None) -> Slide:
    """One open slide per worker process and file: opening an SVS costs tens of milliseconds."""
    return Slide.open(path, slide_mpp=slide_mpp)


@lru_cache(maxsize=8)
def _cached_card(model: str) -> ModelCard:
    return load_card(model)


def versions() -> dict[str, str]:
    found = {"wsi-espnet": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


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


def prepare_slide(job: SlideJob, outdir: Path, settings: SegmentSettings) -> SlidePlan | SlideFailure:
    """Open the slide, detect tissue, create (or resume) the store, list the chunks to infer."""
    start = time.perf_counter()
    output = SlideOutput.for_slide(outdir, job.path)
    try:
        if output.is_complete() and not settings.overwrite:
            return _skipped_plan(job, output)
        card = load_card(settings.model)
        slide = Slide.open(job.path, slide_mpp=job.slide_mpp or settings.slide_mpp)
        with slide:
            mpp = settings.mpp or card.mpp
            shape = slide.analysis_shape(mpp)
            _check_resolution(slide, mpp, shape)
            t0 = time.perf_counter()
            if settings.tissue_detection:
                tissue = detect_tissue(slide, settings.tissue)
            else:
                tissue = _everything(slide, settings.tissue.thumbnail_mpp)
            tissue_seconds = time.perf_counter() - t0
            slide_meta = slide.metadata()
        grid = TileGrid(shape, settings.tile, settings.halo)
        selected = grid.select(tissue, mpp) if settings.tissue_detection else grid.chunks
        record = _run_record(job, output, card, settings, mpp, slide_meta, grid, len(selected))
        _open_or_create_store(output, card, settings, mpp, shape, slide_meta, record)
        done = ProgressLog(output.progress_dir).done()
        todo = [c.index for c in selected if c.index not in done]
        output.write_run(record)
        return SlidePlan(
            job=job,
            output=output,
            shape=shape,
            mpp=mpp,
            slide_mpp=float(slide_meta["mpp"]),
            todo=todo,
            n_chunks=len(grid.chunks),
            n_tissue_chunks=len(selected),
            n_done_before=len(selected) - len(todo),
            tissue=tissue,
            record=record,
            timings={"prepare_s": time.perf_counter() - start, "tissue_detection_s": tissue_seconds},
        )
    except WsiEspnetError as exc:
        return SlideFailure(job, str(exc))


def _skipped_plan(job: SlideJob, output: SlideOutput) -> SlidePlan:
    run = output.read_run() or {}
    empty = TissueMask(np.zeros((1, 1), bool), np.zeros((1, 1), np.int32), 1.0)
    return SlidePlan(job, output, (0, 0), 0.0, 0.0, [], 0, 0, 0, empty, run, skipped=True)


def _everything(slide: Slide, mpp: float) -> TissueMask:
    """A mask that covers the whole slide (``--no-tissue-detection``): one fragment."""
    h, w = slide.analysis_shape(mpp)
    return TissueMask(np.ones((h, w), bool), np.ones((h, w), np.int32), mpp)


def _run_record(
    job: SlideJob,
    output: SlideOutput,
    card: ModelCard,
    settings: SegmentSettings,
    mpp: float,
    slide_meta: dict[str, Any],
    grid: TileGrid,
    n_selected: int,
) -> dict[str, Any]:
    return {
        "status": "running",
        "slide": str(job.path.resolve()),
        "output": str(output.root.resolve()),
        "versions": versions(),
        "model": {
            "name": card.name,
            "card": str(card.path),
            "card_sha256": sha256_file(card.path),
            "weights_sha256": card.weights_sha256,
            "trained": card.trained,
            "classes": card.class_table(),
        },
        "parameters": settings.as_record() | {"mpp": mpp, "slide_mpp": job.slide_mpp or settings.slide_mpp},
        "slide_metadata": slide_meta,
        "tiles": {
            "total": len(grid.chunks),
            "tissue": n_selected,
            "skipped_background": len(grid.chunks) - n_selected,
        },
    }


def _store_params(card: ModelCard, settings: SegmentSettings, mpp: float, shape: tuple[int, int]) -> dict:
    return {
        "model": card.weights_sha256 or card.name,
        "mpp": mpp,
        "tile": settings.tile,
        "halo": settings.halo,
        "shape": list(shape),
        "zarr_format": settings.zarr_format,
        "tissue_detection": settings.tissue_detection,
    }


def _open_or_create_store(
    output: SlideOutput,
    card: ModelCard,
    settings: SegmentSettings,
    mpp: float,
    shape: tuple[int, int],
    slide_meta: dict[str, Any],
    record: dict[str, Any],
) -> None:
    """Resume a partial store made with the same parameters; otherwise start afresh.

    Only now, with the slide and model known to be usable, is an old output removed: a bad
    input never destroys results that were already there.
    """
    params = _store_params(card, settings, mpp, shape)
    previous = output.read_run()
    same = previous is not None and previous.get("store_params") == params and output.store.is_dir()
    if same and not settings.overwrite:
        record["store_params"] = params
        record["resumed"] = True
        SlideStore.open(output.store)  # checks it is a readable wsi-espnet store
        return
    if output.root.exists():
        if previous is not None and not settings.overwrite:
            logger.warning("%s: partial output made with other parameters; starting again", output.root)
        output.clear()
    output.root.mkdir(parents=True, exist_ok=True)
    record["store_params"] = params
    record["resumed"] = False
    slide_block = {
        "path": str(slide_meta.get("path")),
        "mpp": float(slide_meta["mpp"]),
        "dimensions": list(slide_meta["dimensions"]),
        "bounds_offset": list(slide_meta.get("bounds_offset", (0, 0))),
    }
    SlideStore.create(
        output.store,
        shape,
        settings.tile,
        mpp,
        card.class_table(),
        zarr_format=settings.zarr_format,
        attrs={
            "model": {"name": card.name, "sha256": card.weights_sha256 or ""},
            "halo": settings.halo,
            "slide": slide_block,
        },
    )


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


def infer_chunks(plan: SlidePlan, chunk_indices: list[tuple[int, int]], settings: SegmentSettings) -> int:
    """Read, infer and write ``chunk_indices`` of one slide; record them as done. Returns count.

    The next mini-batch is read in a background thread while the current one is on the
    model, so disk and decode time hide behind compute. Each chunk is written exactly once,
    whole, by the only task that owns it: no locks and no read-modify-write.
    """
    _give_torch_the_worker_threads()
    slide = _cached_slide(str(plan.job.path), plan.job.slide_mpp or settings.slide_mpp)
    predictor = get_predictor(_cached_card(settings.model), settings.device)
    store = SlideStore.open(plan.output.store)
    grid = TileGrid(plan.shape, settings.tile, settings.halo)
    chunks = [grid.chunk((int(iy), int(ix))) for iy, ix in chunk_indices]
    batches = [chunks[i : i + settings.batch_size] for i in range(0, len(chunks), settings.batch_size)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tile-reader") as reader:
        pending = reader.submit(_read_windows, slide, grid, batches[0], plan.mpp)
        for k, batch in enumerate(batches):
            windows = pending.result()
            if k + 1 < len(batches):
                pending = reader.submit(_read_windows, slide, grid, batches[k + 1], plan.mpp)
            prediction = predictor.predict(windows, crop=settings.halo)
            for j, chunk in enumerate(batch):
                labels = prediction.labels[j, : chunk.h, : chunk.w]
                if settings.tissue_detection:  # tissue at analysis resolution, from the whole window
                    y, x, _, _ = grid.window(chunk)
                    tissue = plan.tissue.refine(windows[j], y, x, plan.mpp, grid.core(chunk))
                    labels = np.where(tissue, labels, 0)
                store.write_chunk(chunk.index, prediction.scores[j, :, : chunk.h, : chunk.w], labels)
    first = chunk_indices[0]
    ProgressLog(plan.output.progress_dir).record(f"{first[0]}-{first[1]}-{len(chunk_indices)}", chunk_indices)
    return len(chunk_indices)


@dataclass
class SlideSummary:
    """The outcome of a finished slide, as the client reports it in summary.csv."""

    tissue_area_mm2: float
    tiles_processed: int
    warnings: list[str]


def finalise_slide(plan: SlidePlan, settings: SegmentSettings, tiles_processed: list[int]) -> SlideSummary:
    """Pyramid, statistics, exports, then — last — the ``complete`` status in run.json and zarr.

    Runs on a worker. Dask calls inside it use the local threaded scheduler: a task must not
    block on the cluster it runs on.
    """
    import dask

    from wsi_espnet.export import export_all
    from wsi_espnet.stats import compute_statistics, write_statistics

    timings = dict(plan.timings)
    store = SlideStore.open(plan.output.store)
    with dask.config.set(scheduler="threads"):
        t0 = time.perf_counter()
        store.build_pyramid()
        timings["pyramid_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = compute_statistics(store, plan.tissue, plan.mpp / plan.slide_mpp)
        write_statistics(stats, plan.output.stats_json, plan.output.stats_csv)
        timings["statistics_s"] = time.perf_counter() - t0
    warnings = []
    if stats["tissue_area_mm2"] == 0:
        warnings.append(f"{plan.job.path}: no tissue found; outputs are empty")
    record = dict(plan.record)
    processed = int(sum(tiles_processed))
    record["tiles"] = {
        **record["tiles"],
        "processed": processed,
        "resumed_from_previous_run": plan.n_done_before,
    }
    record["timings"] = timings
    output_record = dict(record, status="exporting")
    plan.output.write_run(output_record)
    t0 = time.perf_counter()
    if settings.formats:
        export_all(
            plan.output.root,
            settings.formats,
            per_region=settings.geojson_per_region,
            min_area_um2=settings.geojson_min_area_um2,
        )
    timings["exports_s"] = time.perf_counter() - t0
    record["statistics"] = {"tissue_area_mm2": stats["tissue_area_mm2"]}
    record["warnings"] = warnings
    record["status"] = "complete"
    store.set_status("complete")
    plan.output.write_run(record)
    return SlideSummary(float(stats["tissue_area_mm2"]), processed, warnings)


def run_finalise(plan: SlidePlan, settings: SegmentSettings, *counts: int) -> SlideSummary | SlideFailure:
    """Dask entry point: ``counts`` are the infer tasks' results, so this runs after all of them."""
    try:
        return finalise_slide(plan, settings, list(counts))
    except WsiEspnetError as exc:
        return SlideFailure(plan.job, str(exc))
