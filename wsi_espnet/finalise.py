"""What runs after a slide's last block: statistics, pyramid, exports, then the ``complete`` status.

These are separate Dask tasks, so they spread over the workers instead of sharing one worker's
threads and its GIL (measured on the 40x benchmark slide with one finalise task: 56 s, against
about 25 s of the same work in separate processes)::

    infer tasks ─┬─ GeoJSON (level 0: band by band as the blocks finish) ──────┐
                 ├─ statistics ──────────┬─ PNG ─────────────────────────────────┼─ complete
                 └─ pyramid ─────────────┴─ OME-TIFF (and a coarser GeoJSON) ────┘  (status, report)
                    (parent units, each as soon as its children are written)

The statistics and a level-0 GeoJSON read only level 0, so they do not wait for the pyramid,
and the GeoJSON counts its tissue area itself rather than wait for the statistics. It does
not even wait for the last block: it starts with the infer tasks and vectorises each band of
chunk rows once no block is left to write in it (:mod:`wsi_espnet.geojson_follow`; 40x
benchmark slide: 31 s after the last block before, 12 s now). The OME-TIFF reads only the
pyramid, the overlay also the statistics (its legend).
The pyramid does not wait for the last block either: each task writes a group of parent units
as soon as the tasks that write their children are done (:func:`submit_pyramid`), so most of it
is built while the last blocks infer. Pyramid and statistics visit only the chunks that were
written (and their parents): on a biopsy slide that is mostly glass they cost what its tissue
costs, not what its area costs. Every stage returns a :class:`Failed` value for a user problem
(it is passed on to ``complete``, which reports the first); ``complete`` writes the status
last, then the HTML report, so the report shows the status that run.json holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import dask

from wsi_espnet.blocks import Block, owned_chunks
from wsi_espnet.config import OutputSettings
from wsi_espnet.errors import WsiEspnetError
from wsi_espnet.export import export_all
from wsi_espnet.export.geojson import needs_pyramid
from wsi_espnet.export.isolated import export_in_process
from wsi_espnet.geojson_follow import GEOJSON, Following, submit_following
from wsi_espnet.infer import Inferred
from wsi_espnet.pyramid import parents, write_units
from wsi_espnet.qc_stats import qc_warnings, write_artifacts_csv
from wsi_espnet.roi_stats import write_roi_csv
from wsi_espnet.runstate import Done, Failed, RunRecord, SlidePlan, Stage
from wsi_espnet.stats import StatisticsOptions, chunk_partials, from_partials, write_statistics
from wsi_espnet.store import SlideStore

REPORT = "html"
NEEDS_STATISTICS = frozenset({"png"})  # the overlay's legend shows them; the report runs in ``complete``
# Exports that run in a child process (``export.isolated``): seconds of GIL-bound work each,
# against the child's start-up of about a second. The PNG and the report take about a second.
ISOLATED = frozenset({GEOJSON, "ometiff"})
ChunkIndex = tuple[int, int]


def submit_following_export(
    submit: Callable[..., Any], plan: SlidePlan, plan_future: Any, settings: OutputSettings
) -> Following | None:
    """The one stage submitted before the slide's infer tasks: its GeoJSON, when it follows them
    (:func:`follows_inference`); pass the result on to :func:`submit_finalise`."""
    if GEOJSON in settings.formats and follows_inference(plan, settings):
        return submit_following(submit, plan_future, settings)
    return None


def submit_finalise(
    submit: Callable[..., Any],
    plan: SlidePlan,
    plan_future: Any,
    settings: OutputSettings,
    writes: dict[Any, list[Block]],
    following: Following | None = None,
) -> Any:
    """Submit the slide's finalise graph; return ``complete``'s future.

    ``writes`` maps each infer future to the blocks it writes, ``following`` is what
    :func:`submit_following_export` returned. ``submit(func, *args,
    priority=0)`` submits one task (``Client.submit`` with the run's options). The level-0
    GeoJSON, the longest stage, needs neither statistics nor pyramid: it follows the blocks
    (or, per region, goes first after them). The other exports read pyramid levels; only the
    overlay also waits for the statistics (its legend shows them).
    """
    inferred = list(writes)
    statistics = submit_statistics(submit, plan, plan_future, settings, writes)
    pyramid = submit_pyramid(submit, plan, plan_future, writes)
    exports = []
    for fmt in (f for f in settings.formats if f != REPORT):
        if fmt == GEOJSON and following is not None:
            exports.append(following.hand_over(writes))
        elif fmt == GEOJSON and not needs_pyramid(plan.grid.shape):
            exports.append(submit(run_export, plan_future, settings, fmt, *inferred, priority=1))
        elif fmt in NEEDS_STATISTICS:
            exports.append(submit(run_export, plan_future, settings, fmt, statistics, pyramid))
        else:
            exports.append(submit(run_export, plan_future, settings, fmt, pyramid))
    return submit(run_complete, plan_future, settings, [statistics, pyramid, *exports], *inferred)


def follows_inference(plan: SlidePlan, settings: OutputSettings) -> bool:
    """Whether the GeoJSON is vectorised while the slide infers (:mod:`wsi_espnet.geojson_follow`):
    a level-0 one of one feature per class. A per-region GeoJSON writes each region's fraction
    of the slide's tissue as it closes, so it waits for the whole map."""
    return not needs_pyramid(plan.grid.shape) and not settings.geojson_per_region


def _first_failure(values: tuple[Any, ...] | list[Any]) -> Failed | None:
    return next((value for value in values if isinstance(value, Failed)), None)


@dataclass(frozen=True)
class _Partials:
    """The statistics' per-chunk partials of one infer task's chunks, and the seconds they took."""

    parts: list[Any]
    seconds: float


def submit_statistics(
    submit: Callable[..., Any],
    plan: SlidePlan,
    plan_future: Any,
    settings: OutputSettings,
    writes: dict[Any, list[Block]],
) -> Any:
    """Submit the statistics: each infer task's chunk partials as soon as it is done (priority 1,
    so they are computed while the last blocks infer), and the reduction after the last one.

    Chunks of an earlier run (``plan.written``) get a partial task of their own. Return the
    future of the statistics :class:`Stage`.
    """
    inferred = list(writes)
    groups = [(sorted(owned_chunks(blocks)), (future,)) for future, blocks in writes.items()]
    if plan.written:
        groups.append((sorted(plan.written), ()))
    parts = [
        submit(run_statistics_partials, plan_future, settings, indices, *after, priority=1)
        for indices, after in groups
    ]
    return submit(run_statistics, plan_future, settings, parts, *inferred)


def run_statistics_partials(
    plan: SlidePlan, settings: OutputSettings, indices: list[ChunkIndex], *after: Inferred | Failed
) -> _Partials | Failed:
    """The statistics' partials of level-0 chunks ``indices``, once the task ``after`` wrote them."""
    if (failed := _first_failure(after)) is not None:
        return failed
    started = time.perf_counter()
    try:
        store = SlideStore.open(plan.output.store)
        parts = chunk_partials(store, plan.tissue, indices, _statistics_options(plan, settings))
    except WsiEspnetError as exc:
        return Failed(plan.job, str(exc))
    return _Partials(parts, time.perf_counter() - started)


def _statistics_options(plan: SlidePlan, settings: OutputSettings) -> StatisticsOptions:
    return StatisticsOptions(plan.roi, settings.low_confidence)


def run_statistics(
    plan: SlidePlan,
    settings: OutputSettings,
    partials: list[_Partials | Failed],
    *inferred: Inferred | Failed,
) -> Stage | Failed:
    """Statistics from level 0 (``partials``: every written chunk's, in groups): stats.json/.csv
    (and the ROI and QC tables); run.json ``exporting``."""
    if (failed := _first_failure(inferred) or _first_failure(partials)) is not None:
        return failed
    started = time.time()
    groups = cast(list[_Partials], partials)
    try:
        store = SlideStore.open(plan.output.store)
        parts = [part for group in groups for part in group.parts]
        with dask.config.set(scheduler="threads"):
            options = _statistics_options(plan, settings)
            stats = from_partials(store, parts, plan.mpp / plan.slide_mpp, options)
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
    seconds = time.time() - started + sum(group.seconds for group in groups)
    timings = {**_stage_seconds(inferred), "statistics_s": seconds}
    record = RunRecord.read(plan.output).finished(processed, timings, area)
    record = record.with_fields(
        inference={
            **record.fields.get("inference", {}),
            "input_pixels_this_run": sum(i.input_pixels for i in inferred if isinstance(i, Inferred)),
        }
    )
    record.write(plan.output)
    return Stage("statistics", started, time.time(), area, warnings)


def submit_pyramid(
    submit: Callable[..., Any], plan: SlidePlan, plan_future: Any, writes: dict[Any, list[Block]]
) -> Any:
    """Submit levels 1..n, each group of parent units after the tasks that write its children.

    Parents whose children have the same writers share a task, so a level costs about as many
    tasks as the level below has writers; the pyramid's tasks go before waiting blocks
    (priority 1) and run while the last blocks infer. Chunks of an earlier run (``plan.written``)
    need no writer. Return the future of the stage's summary (a :class:`Stage`).
    """
    writers: dict[ChunkIndex, tuple[Any, ...]] = {index: () for index in plan.written}
    for future, blocks in writes.items():
        writers.update({index: (future,) for index in owned_chunks(blocks)})
    parts = []
    for level in range(1, plan.levels):
        groups: dict[frozenset[Any], list[ChunkIndex]] = {}
        for unit, children in sorted(parents(writers).items()):
            groups.setdefault(frozenset(f for child in children for f in writers[child]), []).append(unit)
        writers = {}
        for after, units in groups.items():
            part = submit(run_pyramid_units, plan_future, level, units, *after, priority=1)
            parts.append(part)
            writers.update({unit: (part,) for unit in units})
    return submit(run_pyramid_done, plan_future, *parts)


def run_pyramid_units(plan: SlidePlan, level: int, units: list[ChunkIndex], *after: Any) -> Stage | Failed:
    """Write ``units`` of pyramid ``level`` in every layer, once the tasks ``after`` are done."""
    if (failed := _first_failure(after)) is not None:
        return failed
    started = time.time()
    try:
        layers = SlideStore.open(plan.output.store).pyramid_layers(range(level - 1, level + 1))
        write_units(layers, units)
    except WsiEspnetError as exc:
        return Failed(plan.job, str(exc))
    return Stage("pyramid", started, time.time())


def run_pyramid_done(plan: SlidePlan, *parts: Stage | Failed) -> Stage | Failed:
    """The pyramid stage as one :class:`Stage`: from its first task's start to its last's end."""
    if (failed := _first_failure(parts)) is not None:
        return failed
    stages = cast(tuple[Stage, ...], parts)
    now = time.time()
    return Stage(
        "pyramid",
        min((s.started for s in stages), default=now),
        max((s.ended for s in stages), default=now),
        busy_s=sum(s.seconds for s in stages),
    )


def run_export(
    plan: SlidePlan, settings: OutputSettings, fmt: str, *after: Stage | Inferred | Failed
) -> Stage | Failed:
    """One export, after what it reads (``after``: the statistics and the pyramid, or for a
    level-0 GeoJSON the infer tasks)."""
    if (failed := _first_failure(after)) is not None:
        return failed
    started, cpu_s = time.time(), None
    try:
        if fmt in ISOLATED:
            cpu_s = export_in_process(plan.output.root, fmt, settings)
        else:
            export_all(plan.output.root, (fmt,), settings)
    except WsiEspnetError as exc:
        return Failed(plan.job, str(exc))
    return Stage(fmt, started, time.time(), cpu_s=cpu_s)


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
        started = _inference_end(inferred, statistics)
        timings = {
            **record.fields["timings"],
            "pyramid_s": pyramid.seconds,
            "exports_s": {stage.name: stage.seconds for stage in exports},
            "exports_cpu_s": {stage.name: stage.cpu_s for stage in exports if stage.cpu_s is not None},
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


def _inference_end(inferred: tuple[Inferred | Failed, ...], statistics: Stage) -> float:
    """When the slide's last infer task ended: where its post-inference wall time starts (the
    statistics' start when every chunk came from an earlier run)."""
    ends = [i.ended for i in inferred if isinstance(i, Inferred)]
    return max(ends) if ends else statistics.started


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
