"""The Dask graph for a cohort of slides: prepare → chunk batches → finalise stages, per slide.

Slide-level and chunk-level parallelism together: every slide's ``prepare`` task is submitted
at once; as each plan arrives its blocks are grouped into tasks of about ``chunks_per_task`` chunks
(so one large slide keeps many workers busy) and the finalise tasks (statistics, pyramid,
exports, ``complete``: :mod:`wsi_espnet.finalise`) that depend on all of them. Plans travel
worker-to-worker as Dask futures; the client never touches pixels.

Slides, the model and the output folder are checked in the client first (``preflight.py``):
a slide that fails there, or whose task fails, is recorded ``failed`` with its one-line error
while the others finish; Ctrl-C leaves each store resumable (``.progress`` records finished chunks).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed import Client, Future, as_completed, performance_report
from tqdm.auto import tqdm

from wsi_espnet.blocks import Block
from wsi_espnet.cluster import dashboard_link, open_client
from wsi_espnet.config import SegmentSettings
from wsi_espnet.finalise import submit_finalise, submit_following_export
from wsi_espnet.infer import Inferred, infer_task
from wsi_espnet.outputs import SlideOutput, write_summary
from wsi_espnet.preflight import check_output_dir, check_run
from wsi_espnet.prepare import prepare_slide
from wsi_espnet.runstate import Done, Failed, Outcome, Skipped, SlideJob, SlidePlan

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
    warnings: str = ""  # the slide's warnings (e.g. QC's), "; "-joined

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
            "warnings": self.warnings,
        }


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

    def finish(self, outcome: Outcome) -> None:
        """Record the slide's outcome; the first one wins (e.g. the first failing batch)."""
        if self.result is not None:
            return
        seconds = time.perf_counter() - self.started
        match outcome:
            case Failed(error=error):
                self.result = SlideResult(self.job.path, "failed", error, seconds)
            case Skipped(tissue_area_mm2=area):
                message = "already complete (use --overwrite to redo)"
                self.result = SlideResult(self.job.path, "skipped", message, seconds, tissue_area_mm2=area)
            case Done():
                for warning in outcome.warnings:
                    logger.warning(warning)
                self.result = SlideResult(
                    self.job.path, "done", "", seconds, outcome.tiles_processed, outcome.tissue_area_mm2
                )
                self.result.warnings = "; ".join(outcome.warnings)


class _CohortRun:
    """The client's side of one run: which future belongs to which slide, and what comes next."""

    def __init__(self, client: Client, outdir: Path, settings: SegmentSettings, bar: tqdm) -> None:
        self.client, self.outdir, self.settings, self.bar = client, outdir, settings, bar
        self.resources = _gpu_resources(client)
        self.futures = as_completed()
        self.owner: dict[Future, SlideJob] = {}

    def submit(self, job: SlideJob, func: Any, *args: Any, **options: Any) -> Future:
        future = self.client.submit(func, *args, pure=False, retries=self.settings.retries, **options)
        self.owner[future] = job
        self.futures.add(future)
        return future

    def run(self, trackers: dict[SlideJob, _SlideTracker]) -> None:
        """Submit every slide's prepare task, then react to each result as it arrives."""
        for job, tracker in trackers.items():
            if tracker.result is None:
                self.submit(job, prepare_slide, job, self.outdir, self.settings)
        for future in self.futures:
            job = self.owner.pop(future)
            try:
                value = future.result()
            except Exception as exc:  # a task crashed (worker lost too often, or a bug)
                value = Failed(job, f"{job.path}: {type(exc).__name__}: {exc}".splitlines()[0])
            if isinstance(value, SlidePlan):
                self.schedule(future, value)
            elif isinstance(value, Inferred):
                self.bar.update(value.chunks)
                if self.bar.n >= self.bar.total:
                    self.bar.set_postfix_str("pyramid, statistics, exports", refresh=True)
            else:
                trackers[job].finish(value)

    def schedule(self, plan_future: Future, plan: SlidePlan) -> None:
        """After ``prepare``: submit the slide's chunk tasks and its finalise task."""
        self.bar.total += plan.n_todo
        self.bar.refresh()
        outputs = self.settings.outputs
        following = submit_following_export(self.submit_stage, plan, plan_future, outputs)
        writes = {
            self.submit(
                plan.job, infer_task, plan_future, group, self.settings.inference, resources=self.resources
            ): group
            for group in task_groups(list(plan.blocks), self.settings.chunks_per_task)
        }
        complete = submit_finalise(self.submit_stage, plan, plan_future, outputs, writes, following)
        self.owner[complete] = plan.job
        self.futures.add(complete)

    def submit_stage(self, func: Any, *args: Any, priority: int = 0) -> Future:
        """A finalise stage: an input of the slide's ``complete`` task, not awaited by the client."""
        return self.client.submit(func, *args, pure=False, retries=self.settings.retries, priority=priority)


def task_groups(blocks: list[Block], chunks_per_task: int) -> list[list[Block]]:
    """Whole blocks in groups of about ``chunks_per_task`` chunks: one Dask task each.

    A task is the unit of retries and of load balancing; a block is never split across tasks.
    """
    groups: list[list[Block]] = []
    size = 0
    for block in blocks:
        if not groups or size >= chunks_per_task:
            groups.append([])
            size = 0
        groups[-1].append(block)
        size += len(block.owned)
    return groups


def segment_slides(
    jobs: list[SlideJob],
    outdir: Path,
    settings: SegmentSettings,
    client: Client,
    refused: dict[SlideJob, Failed] | None = None,
) -> list[SlideResult]:
    """Segment ``jobs`` on ``client``'s cluster; write per-slide outputs and merge ``summary.csv``.

    ``refused`` are the slides the preflight check failed (:func:`preflight.check_run`, run here
    when the caller has not): they are recorded ``failed`` without a task.
    """
    outdir = Path(outdir)
    refused = check_run(jobs, outdir, settings) if refused is None else refused
    check_output_dir(outdir)
    trackers = {job: _SlideTracker(job) for job in jobs}
    for job, failure in (refused or {}).items():
        trackers[job].finish(failure)
    bar = tqdm(total=0, unit="tile", desc="segment", disable=settings.quiet, dynamic_ncols=True)
    try:
        _CohortRun(client, outdir, settings, bar).run(trackers)
    finally:
        bar.close()
        results = [t.result or SlideResult(t.job.path, "failed", "interrupted") for t in trackers.values()]
        _write_summary(outdir, results)
    return results


def _write_summary(outdir: Path, results: list[SlideResult]) -> None:
    for result in results:
        result.output = SlideOutput.for_slide(outdir, result.slide).root
    write_summary(outdir, [r.as_row() for r in results])


@contextlib.contextmanager
def maybe_performance_report(path: Path | None) -> Iterator[None]:
    """Dask's HTML performance report around the run, when ``--performance-report`` is given."""
    if path is None:
        yield
    else:
        with performance_report(filename=str(path)):
            yield


def run_segment(
    jobs: list[SlideJob],
    outdir: Path,
    settings: SegmentSettings,
    refused: dict[SlideJob, Failed] | None = None,
) -> list[SlideResult]:
    """Check the inputs, start (or connect to) the cluster the settings name, segment ``jobs``.

    ``refused`` is the result of :func:`preflight.check_run` when the caller ran it already.
    When no slide passes the check, no cluster is started: the slides are recorded ``failed``.
    """
    outdir = Path(outdir)
    refused = check_run(jobs, outdir, settings) if refused is None else refused
    if len(refused) == len(jobs):
        check_output_dir(outdir)
        results = [SlideResult(job.path, "failed", refused[job].error) for job in jobs]
        _write_summary(outdir, results)
        return results
    check_output_dir(outdir)
    with open_client(settings) as client:
        logger.info("Dask dashboard: %s", dashboard_link(client))
        with maybe_performance_report(settings.performance_report):
            return segment_slides(jobs, outdir, settings, client, refused)
