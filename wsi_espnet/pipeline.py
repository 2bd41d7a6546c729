"""The Dask graph for a cohort of slides: prepare → chunk batches → finalise, per slide.

Slide-level and chunk-level parallelism together: every slide's ``prepare`` task is submitted
at once; as each plan arrives its chunks are split into tasks of ``chunks_per_task`` chunks
(so one large slide keeps many workers busy) and a ``finalise`` task that depends on all of
them. Plans travel worker-to-worker as Dask futures; the client never touches pixels.

A slide whose task fails is recorded ``failed`` with its one-line error while the others
finish; Ctrl-C leaves each store resumable (``.progress`` records finished chunks).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed import Client, Future, LocalCluster, as_completed, performance_report
from tqdm.auto import tqdm

from wsi_espnet.cluster import dashboard_link, load_profile, start_cluster
from wsi_espnet.config import SegmentSettings
from wsi_espnet.errors import OutputError
from wsi_espnet.outputs import SlideOutput, slide_stem, write_summary
from wsi_espnet.tasks import (
    SlideFailure,
    SlideJob,
    SlidePlan,
    SlideSummary,
    infer_chunks,
    prepare_slide,
    run_finalise,
)

logger = logging.getLogger(__name__)


@dataclass
class SlideResult:
    """One row of summary.csv."""

    slide: Path
    status: str  # done | skipped | failed
    error: str = ""
    seconds: float = 0.0
    tiles_processed: int = 0
    tissue_area_mm2: float | None = None
    output: Path | None = None

    def as_row(self) -> dict[str, Any]:
        area = "" if self.tissue_area_mm2 is None else round(self.tissue_area_mm2, 6)
        return {
            "slide": str(self.slide),
            "status": self.status,
            "error": self.error,
            "seconds": round(self.seconds, 2),
            "tiles_processed": self.tiles_processed,
            "tissue_area_mm2": area,
            "output": "" if self.output is None else str(self.output),
        }


def check_output_dir(outdir: Path) -> None:
    """Fail early, with the folder's name, when results could not be written there."""
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder: {exc.strerror}", outdir) from exc
    if not os.access(outdir, os.W_OK | os.X_OK):
        raise OutputError("output folder is not writable", outdir)


def _gpu_resources(client: Client) -> dict[str, int] | None:
    """Ask for a ``GPU`` resource only when workers advertise one (else tasks would never run)."""
    workers = client.scheduler_info().get("workers", {}).values()
    return {"GPU": 1} if any("GPU" in w.get("resources", {}) for w in workers) else None


class _SlideTracker:
    """Client-side bookkeeping for one slide while its tasks run."""

    def __init__(self, job: SlideJob) -> None:
        self.job = job
        self.started = time.perf_counter()
        self.result: SlideResult | None = None

    def finish(self, status: str, error: str = "", **fields: Any) -> None:
        if self.result is None:  # the first outcome wins (e.g. the first failing batch)
            seconds = time.perf_counter() - self.started
            self.result = SlideResult(self.job.path, status, error, seconds, **fields)


def segment_slides(
    jobs: list[SlideJob], outdir: Path, settings: SegmentSettings, client: Client
) -> list[SlideResult]:
    """Segment ``jobs`` on ``client``'s cluster; write per-slide outputs and ``summary.csv``."""
    outdir = Path(outdir)
    check_output_dir(outdir)
    trackers = {job: _SlideTracker(job) for job in jobs}
    _fail_duplicate_stems(trackers)
    resources = _gpu_resources(client)
    futures = as_completed()
    role: dict[Future, tuple[str, SlideJob]] = {}
    for job, tracker in trackers.items():
        if tracker.result is None:
            fut = client.submit(prepare_slide, job, outdir, settings, pure=False, retries=settings.retries)
            role[fut] = ("prepare", job)
            futures.add(fut)
    bar = tqdm(total=0, unit="tile", desc="segment", disable=settings.quiet, dynamic_ncols=True)
    try:
        for fut in futures:
            kind, job = role.pop(fut)
            tracker = trackers[job]
            try:
                value = fut.result()
            except Exception as exc:  # a task crashed (worker lost too often, bug, unreadable tile)
                tracker.finish("failed", f"{job.path}: {type(exc).__name__}: {exc}".splitlines()[0])
                continue
            if kind == "prepare":
                for new in _schedule(client, fut, value, tracker, settings, resources, bar):
                    role[new[0]] = (new[1], job)
                    futures.add(new[0])
            elif kind == "infer":
                bar.update(value)
            elif isinstance(value, SlideFailure):
                tracker.finish("failed", value.error)
            else:
                _report_done(tracker, value)
    finally:
        bar.close()
        results = [t.result or SlideResult(t.job.path, "failed", "interrupted") for t in trackers.values()]
        for result in results:
            result.output = SlideOutput.for_slide(outdir, result.slide).root
        write_summary(outdir, [r.as_row() for r in results])
    return results


def _schedule(
    client: Client,
    plan_future: Future,
    plan: SlidePlan | SlideFailure,
    tracker: _SlideTracker,
    settings: SegmentSettings,
    resources: dict[str, int] | None,
    bar: tqdm,
) -> Iterator[tuple[Future, str]]:
    """After ``prepare``: submit the slide's chunk tasks and its finalise task."""
    if isinstance(plan, SlideFailure):
        tracker.finish("failed", plan.error)
        return
    if plan.skipped:
        area = (plan.record.get("statistics") or {}).get("tissue_area_mm2")
        tracker.finish("skipped", "already complete (use --overwrite to redo)", tissue_area_mm2=area)
        return
    bar.total += len(plan.todo)
    bar.refresh()
    step = settings.chunks_per_task
    infer_futures = []
    for i in range(0, len(plan.todo), step):
        fut = client.submit(
            infer_chunks,
            plan_future,
            plan.todo[i : i + step],
            settings,
            pure=False,
            retries=settings.retries,
            resources=resources,
        )
        infer_futures.append(fut)
        yield fut, "infer"
    final = client.submit(
        run_finalise, plan_future, settings, *infer_futures, pure=False, retries=settings.retries
    )
    yield final, "finalise"


def _report_done(tracker: _SlideTracker, summary: SlideSummary) -> None:
    for warning in summary.warnings:
        logger.warning(warning)
    tracker.finish("done", tiles_processed=summary.tiles_processed, tissue_area_mm2=summary.tissue_area_mm2)


def _fail_duplicate_stems(trackers: dict[SlideJob, _SlideTracker]) -> None:
    """Two slides named alike would write into one folder: the later ones fail up front."""
    seen: dict[str, Path] = {}
    for job, tracker in trackers.items():
        stem = slide_stem(job.path)
        if stem in seen:
            tracker.finish("failed", f"{job.path}: same output name '{stem}' as {seen[stem]}; rename one")
        else:
            seen[stem] = job.path


@contextlib.contextmanager
def maybe_performance_report(path: Path | None) -> Iterator[None]:
    """Dask's HTML performance report around the run, when ``--performance-report`` is given."""
    if path is None:
        yield
    else:
        with performance_report(filename=str(path)):
            yield


@contextlib.contextmanager
def open_client(settings: SegmentSettings) -> Iterator[Client]:
    """The Dask client a run uses: a running scheduler, a cluster profile, or a LocalCluster.

    ``--workers 0`` runs everything in this process (threads only), which makes a debugger
    and ``print`` work inside tasks.
    """
    if settings.scheduler is None and settings.cluster is None and settings.workers == 0:
        with (
            LocalCluster(n_workers=1, threads_per_worker=settings.threads, processes=False) as cluster,
            Client(cluster) as client,
        ):
            yield client
        return
    profile = load_profile(settings.cluster or "local")
    local = profile.is_local and settings.scheduler is None
    with start_cluster(
        profile,
        jobs=settings.jobs,
        adapt=settings.adapt,
        scheduler_address=settings.scheduler,
        workers=settings.workers if local else None,
        threads=settings.threads if local else None,
    ) as client:
        yield client


def run_segment(jobs: list[SlideJob], outdir: Path, settings: SegmentSettings) -> list[SlideResult]:
    """Start (or connect to) the cluster the settings name and segment ``jobs`` on it."""
    check_output_dir(Path(outdir))
    with open_client(settings) as client:
        logger.info("Dask dashboard: %s", dashboard_link(client))
        with maybe_performance_report(settings.performance_report):
            return segment_slides(jobs, Path(outdir), settings, client)
