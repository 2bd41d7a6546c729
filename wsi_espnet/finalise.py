"""What runs after a slide's last block: statistics, pyramid, exports, then the ``complete`` status.

These are separate Dask tasks, so they spread over the workers instead of sharing one worker's
threads and its GIL (measured on the 40x benchmark slide with one finalise task: 56 s, against
about 25 s of the same work in separate processes)::

    infer tasks ─┬─ GeoJSON (level 0) ─────────────────────────┐
                 ├─ statistics ─┬─ OME-TIFF, PNG (read levels) ─┴─ complete (status, report)
                 └─ pyramid ────┘

The statistics and a level-0 GeoJSON read only level 0, so they do not wait for the pyramid,
and the GeoJSON counts its tissue area itself rather than wait for the statistics.
Pyramid and statistics visit only the chunks that were written (and, for the pyramid, their
parents): on a biopsy slide that is mostly glass they cost what its tissue costs, not what its
area costs. Every stage returns a :class:`Failed` value for a user problem (it is passed on to
``complete``, which reports the first); ``complete`` writes the status last, then the HTML
report, so the report shows the status that run.json holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import dask

from wsi_espnet.config import OutputSettings
from wsi_espnet.errors import WsiEspnetError
from wsi_espnet.export import export_all
from wsi_espnet.export.geojson import needs_pyramid
from wsi_espnet.export.isolated import export_in_process
from wsi_espnet.infer import Inferred
from wsi_espnet.outputs import ProgressLog
from wsi_espnet.qc_stats import qc_warnings, write_artifacts_csv
from wsi_espnet.roi_stats import write_roi_csv
from wsi_espnet.runstate import Done, Failed, RunRecord, SlidePlan
from wsi_espnet.stats import StatisticsOptions, compute_statistics, write_statistics
from wsi_espnet.store import SlideStore

REPORT = "html"
GEOJSON = "geojson"
# Exports that run in a child process (``export.isolated``): seconds of GIL-bound work each,
# against the child's start-up of about a second. The PNG and the report take about a second.
ISOLATED = frozenset({GEOJSON, "ometiff"})


@dataclass(frozen=True)
class Stage:
    """What one finalise stage did: wall-clock start and end (``time.time``, comparable across
    the workers of one machine or a cluster with synchronised clocks) and what ``complete`` needs."""

    name: str
    started: float
    ended: float
    tissue_area_mm2: float | None = None  # the statistics stage's
    warnings: tuple[str, ...] = field(default=())

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def submit_finalise(
    submit: Callable[..., Any],
    plan: SlidePlan,
    plan_future: Any,
    settings: OutputSettings,
    inferred: list[Any],
) -> Any:
    """Submit the slide's finalise graph after its ``inferred`` futures; return ``complete``'s future.

    ``submit(func, *args, priority=0)`` submits one task (``Client.submit`` with the run's
    options). The level-0 GeoJSON, the longest stage, needs neither statistics nor pyramid
    and goes first; the other exports wait for both (the overlay's legend shows the statistics).
    """
    statistics = submit(run_statistics, plan_future, settings, *inferred)
    pyramid = submit(run_pyramid, plan_future, *inferred)
    exports = []
    for fmt in (f for f in settings.formats if f != REPORT):
        if fmt == GEOJSON and not needs_pyramid(plan.grid.shape):
            exports.append(submit(run_export, plan_future, settings, fmt, *inferred, priority=1))
        else:
            exports.append(submit(run_export, plan_future, settings, fmt, statistics, pyramid))
    return submit(run_complete, plan_future, settings, [statistics, pyramid, *exports], *inferred)


def _first_failure(values: tuple[Any, ...] | list[Any]) -> Failed | None:
    return next((value for value in values if isinstance(value, Failed)), None)


def run_statistics(plan: SlidePlan, settings: OutputSettings, *inferred: Inferred | Failed) -> Stage | Failed:
    """Statistics from level 0: stats.json/.csv (and the ROI and QC tables); run.json ``exporting``."""
    if (failed := _first_failure(inferred)) is not None:
        return failed
    started = time.time()
    try:
        store = SlideStore.open(plan.output.store)
        written = ProgressLog(plan.output.progress_dir).done()
        with dask.config.set(scheduler="threads"):
            options = StatisticsOptions(plan.roi, settings.low_confidence)
            stats = compute_statistics(
                store, plan.tissue, plan.mpp / plan.slide_mpp, written, options=options
            )
        write_statistics(stats, plan.output.stats_json, plan.output.stats_csv)
        if "roi" in stats:
            write_roi_csv(stats["roi"], plan.output.roi_csv)
        write_artifacts_csv(stats, plan.output.artifacts_csv)
    except WsiEspnetError as exc:
        return Failed(plan.job, str(exc))
    area = float(stats["tissue_area_mm2"])
    warnings = (f"{plan.job.path}: no tissue found; outputs are empty",) if area == 0 else ()
    warnings += qc_warnings(plan.job.path, plan.qc, stats)
    processed = sum(i.chunks for i in inferred if isinstance(i, Inferred))
    timings = {**_stage_seconds(inferred), "statistics_s": time.time() - started}
    record = RunRecord.read(plan.output).finished(processed, timings, area)
    record = record.with_fields(
        inference={
            **record.fields.get("inference", {}),
            "input_pixels_this_run": sum(i.input_pixels for i in inferred if isinstance(i, Inferred)),
        }
    )
    record.write(plan.output)
    return Stage("statistics", started, time.time(), area, warnings)


def run_pyramid(plan: SlidePlan, *inferred: Inferred | Failed) -> Stage | Failed:
    """Levels 1..n of every layer, from the written chunks up (the local threaded scheduler: a
    task must not block on the cluster it runs on)."""
    if (failed := _first_failure(inferred)) is not None:
        return failed
    started = time.time()
    try:
        store = SlideStore.open(plan.output.store)
        with dask.config.set(scheduler="threads"):
            store.build_pyramid(ProgressLog(plan.output.progress_dir).done())
    except WsiEspnetError as exc:
        return Failed(plan.job, str(exc))
    return Stage("pyramid", started, time.time())


def run_export(
    plan: SlidePlan, settings: OutputSettings, fmt: str, *after: Stage | Inferred | Failed
) -> Stage | Failed:
    """One export, after what it reads (``after``: the statistics and the pyramid, or for a
    level-0 GeoJSON the infer tasks)."""
    if (failed := _first_failure(after)) is not None:
        return failed
    started = time.time()
    try:
        if fmt in ISOLATED:
            export_in_process(plan.output.root, fmt, settings)
        else:
            export_all(plan.output.root, (fmt,), settings)
    except WsiEspnetError as exc:
        return Failed(plan.job, str(exc))
    return Stage(fmt, started, time.time())


def run_complete(
    plan: SlidePlan, settings: OutputSettings, stages: list[Stage | Failed], *inferred: Inferred | Failed
) -> Done | Failed:
    """The ``complete`` status and run.json's finalise timings, then (last) the HTML report."""
    if (failed := _first_failure(inferred) or _first_failure(stages)) is not None:
        return failed
    statistics, pyramid, *exports = cast(list[Stage], stages)
    try:
        SlideStore.open(plan.output.store).set_status("complete")
        record = RunRecord.read(plan.output).with_fields(
            warnings=list(statistics.warnings), status="complete"
        )
        started = min(statistics.started, pyramid.started)
        timings = {
            **record.fields["timings"],
            "pyramid_s": pyramid.seconds,
            "exports_s": {stage.name: stage.seconds for stage in exports},
            "exports_wall_s": _span(exports),
            "finalise_wall_s": time.time() - started,
        }
        record = record.with_fields(timings=timings)
        record.write(plan.output)
        if REPORT in settings.formats:  # last: it shows run.json as it now stands
            report = run_export(plan, settings, REPORT)
            if isinstance(report, Failed):
                return report
            timings["exports_s"][REPORT] = report.seconds
            timings["exports_wall_s"] = _span([*exports, report])
            timings["finalise_wall_s"] = time.time() - started
            record.with_fields(timings=timings).write(plan.output)
    except WsiEspnetError as exc:
        return Failed(plan.job, str(exc))
    processed = int(record.fields["tiles"]["processed"])
    return Done(plan.job, float(statistics.tissue_area_mm2 or 0.0), processed, statistics.warnings)


def _span(stages: list[Stage]) -> float:
    """Wall seconds from the first stage's start to the last one's end (0 without stages)."""
    return max(s.ended for s in stages) - min(s.started for s in stages) if stages else 0.0


def _stage_seconds(inferred: tuple[Inferred | Failed, ...]) -> dict[str, float]:
    """Seconds per inference stage summed over the slide's infer tasks (run.json ``timings``)."""
    done = [i for i in inferred if isinstance(i, Inferred)]
    return {
        "read_s": sum(i.read_s for i in done),
        "inference_s": sum(i.inference_s for i in done),
        "tissue_refine_s": sum(i.tissue_s for i in done),
        "write_s": sum(i.write_s for i in done),
        "qc_s": sum(i.qc_s for i in done),
    }
