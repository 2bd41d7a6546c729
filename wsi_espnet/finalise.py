"""The finalise task of one slide: statistics, pyramid, exports, then the ``complete`` status.

Pyramid and statistics visit only the chunks that were written (and, for the pyramid, their
parents): on a biopsy slide that is mostly glass they cost what its tissue costs, not what its
area costs. The HTML report is written last, after the status is ``complete``, so it shows the
status that run.json holds.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask
import numpy as np

from wsi_espnet.config import OutputSettings
from wsi_espnet.errors import WsiEspnetError
from wsi_espnet.export import export_all, read_slide_thumbnail
from wsi_espnet.export.geojson import geojson_level
from wsi_espnet.infer import Inferred
from wsi_espnet.outputs import ProgressLog
from wsi_espnet.qc_stats import qc_warnings, write_artifacts_csv
from wsi_espnet.roi_stats import write_roi_csv
from wsi_espnet.runstate import Done, Failed, RunRecord, SlidePlan
from wsi_espnet.stats import StatisticsOptions, compute_statistics, write_statistics
from wsi_espnet.store import SlideStore

REPORT = "html"
EXPORT_THREADS = 2


def _stage_seconds(inferred: list[Inferred]) -> dict[str, float]:
    """Seconds per inference stage summed over the slide's infer tasks (run.json ``timings``)."""
    return {
        "read_s": sum(i.read_s for i in inferred),
        "inference_s": sum(i.inference_s for i in inferred),
        "tissue_refine_s": sum(i.tissue_s for i in inferred),
        "write_s": sum(i.write_s for i in inferred),
        "qc_s": sum(i.qc_s for i in inferred),
    }


def finalise_slide(plan: SlidePlan, settings: OutputSettings, inferred: list[Inferred]) -> Done:
    """Statistics, pyramid, exports, then — last — the ``complete`` status and the report.

    Runs on a worker. Dask calls inside it use the local threaded scheduler: a task must not
    block on the cluster it runs on. The statistics and a level-0 GeoJSON read only level 0, so
    they do not wait for the pyramid: the GeoJSON (mostly one core of GEOS and GDAL) runs while
    the pyramid is built, and the exports that read coarse levels start once it is.
    """
    started = time.perf_counter()
    timings = _stage_seconds(inferred)
    store = SlideStore.open(plan.output.store)
    written = ProgressLog(plan.output.progress_dir).done()
    t0 = time.perf_counter()
    stats = _write_statistics(plan, settings, store, written)
    timings["statistics_s"] = time.perf_counter() - t0
    area = float(stats["tissue_area_mm2"])
    warnings = (f"{plan.job.path}: no tissue found; outputs are empty",) if area == 0 else ()
    warnings += qc_warnings(plan.job.path, plan.qc, stats)
    processed = sum(i.chunks for i in inferred)
    record = RunRecord.read(plan.output).finished(processed, timings, area)
    record = record.with_fields(
        inference={
            **record.fields.get("inference", {}),
            "input_pixels_this_run": sum(i.input_pixels for i in inferred),
        }
    )
    record.write(plan.output)
    first = [f for f in settings.formats if f != REPORT]
    # The overlay and the report show the same slide thumbnail: read it once, not per export.
    needs_thumbnail = {"png", REPORT} & set(settings.formats)
    export = _Exporter(plan, settings, read_slide_thumbnail(store) if needs_thumbnail else None)
    early = [f for f in first if f == "geojson" and geojson_level(store) == 0]
    # Two exports at a time: GEOS, rasterio and the TIFF codecs release the GIL.
    with ThreadPoolExecutor(max_workers=EXPORT_THREADS, thread_name_prefix="export") as pool:
        t_exports = time.perf_counter()
        pending = {fmt: pool.submit(export, fmt) for fmt in early}
        with dask.config.set(scheduler="threads"):
            t0 = time.perf_counter()
            store.build_pyramid(written)
            timings["pyramid_s"] = time.perf_counter() - t0
        pending.update({fmt: pool.submit(export, fmt) for fmt in first if fmt not in pending})
        exports = {fmt: pending[fmt].result() for fmt in first}
    exports_wall = time.perf_counter() - t_exports
    store.set_status("complete")
    record = record.with_fields(warnings=list(warnings), status="complete")
    timings = {
        **record.fields["timings"],
        "pyramid_s": timings["pyramid_s"],
        "exports_s": exports,
        "exports_wall_s": exports_wall,
        "finalise_wall_s": time.perf_counter() - started,
    }
    record = record.with_fields(timings=timings)
    record.write(plan.output)
    if REPORT in settings.formats:  # last: it shows run.json as it now stands
        exports[REPORT] = export(REPORT)
        timings = {
            **timings,
            "exports_s": exports,
            "exports_wall_s": exports_wall + exports[REPORT],
            "finalise_wall_s": time.perf_counter() - started,
        }
        record.with_fields(timings=timings).write(plan.output)
    return Done(plan.job, area, processed, warnings)


def _write_statistics(
    plan: SlidePlan, settings: OutputSettings, store: SlideStore, written: set[tuple[int, int]]
) -> dict[str, Any]:
    """Compute the slide's statistics from level 0 and write stats.json/.csv (and ROI, QC tables)."""
    with dask.config.set(scheduler="threads"):
        options = StatisticsOptions(plan.roi, settings.low_confidence)
        stats = compute_statistics(store, plan.tissue, plan.mpp / plan.slide_mpp, written, options=options)
    write_statistics(stats, plan.output.stats_json, plan.output.stats_csv)
    if "roi" in stats:
        write_roi_csv(stats["roi"], plan.output.roi_csv)
    write_artifacts_csv(stats, plan.output.artifacts_csv)
    return stats


class _Exporter:
    """One export of the slide, timed: what finalise runs per format (two at a time)."""

    def __init__(self, plan: SlidePlan, settings: OutputSettings, thumbnail: np.ndarray | None) -> None:
        self.plan, self.settings, self.thumbnail = plan, settings, thumbnail

    def __call__(self, fmt: str) -> float:
        t0 = time.perf_counter()
        export_all(self.plan.output.root, (fmt,), self.settings, self.thumbnail)
        return time.perf_counter() - t0


def run_finalise(plan: SlidePlan, settings: OutputSettings, *inferred: Inferred | Failed) -> Done | Failed:
    """Dask entry point: ``inferred`` are the infer tasks' results, so this runs after all of them."""
    failures = [i for i in inferred if isinstance(i, Failed)]
    if failures:
        return failures[0]
    try:
        return finalise_slide(plan, settings, list(inferred))  # type: ignore[arg-type]
    except WsiEspnetError as exc:
        return Failed(plan.job, str(exc))
