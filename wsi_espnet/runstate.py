"""The state of one slide's run, as typed values: the job, its plan, its outcome and its run.json.

Tasks return these instead of raising or mutating dicts: a user-facing problem is a
:class:`Failed` value (so Dask retries only real infrastructure failures), a finished slide is
:class:`Done`, one finished earlier is :class:`Skipped`, and the client dispatches on the type.
:class:`RunRecord` owns ``run.json``: each step returns a new record rather than editing one.
"""

from __future__ import annotations

import csv
import platform
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from wsi_espnet import __version__
from wsi_espnet.blocks import Block
from wsi_espnet.errors import OutputError, SlideError
from wsi_espnet.grid import TileGrid
from wsi_espnet.outputs import SlideOutput, slide_file_record
from wsi_espnet.qc import SlideQc
from wsi_espnet.roi_regions import RoiRegions
from wsi_espnet.tissue import TissueMask

LIBRARIES = ("torch", "numpy", "dask", "distributed", "zarr", "tifffile", "openslide-python", "tiffslide")


@dataclass(frozen=True)
class SlideJob:
    """One slide to segment, with optional per-slide resolution override and ROI (manifest columns)."""

    path: Path
    slide_mpp: float | None = None
    roi: Path | None = None  # wins over --roi


@dataclass(frozen=True)
class Failed:
    """A slide that cannot be processed, and why (one line, naming the file)."""

    job: SlideJob
    error: str


@dataclass(frozen=True)
class Skipped:
    """A slide whose output an earlier run completed (re-run with ``--overwrite`` to redo it)."""

    job: SlideJob
    tissue_area_mm2: float | None


@dataclass(frozen=True)
class Stage:
    """What one finalise stage did: wall-clock start and end (``time.time``, comparable across
    the workers of one machine or a cluster with synchronised clocks) and what ``complete`` needs."""

    name: str
    started: float
    ended: float
    tissue_area_mm2: float | None = None  # the statistics stage's
    warnings: tuple[str, ...] = field(default=())
    busy_s: float | None = None  # a stage of several tasks: their seconds, summed
    cpu_s: float | None = None  # an export in a process of its own: that process tree's CPU seconds

    @property
    def seconds(self) -> float:
        """Seconds of work: the span of one task, the sum over a stage's tasks."""
        return self.ended - self.started if self.busy_s is None else self.busy_s


@dataclass(frozen=True)
class Done:
    """A slide finished by this run."""

    job: SlideJob
    tissue_area_mm2: float
    tiles_processed: int
    warnings: tuple[str, ...] = ()


Outcome = Done | Skipped | Failed


def read_manifest(manifest: Path) -> list[SlideJob]:
    """One job per row of a CSV with a ``slide`` column and optional ``slide_mpp`` and ``roi`` columns.

    Relative slide and ROI paths are relative to the manifest's folder; problems name the file and line.
    """
    try:
        with open(manifest, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise SlideError(f"cannot read manifest: {exc.strerror}", manifest) from exc
    if not rows or "slide" not in rows[0]:
        raise SlideError("manifest needs a header with a 'slide' column", manifest)
    jobs = []
    for line, row in enumerate(rows, start=2):
        path = Path(row["slide"])
        if not path.is_absolute():
            path = manifest.parent / path
        mpp = (row.get("slide_mpp") or "").strip()
        roi = (row.get("roi") or "").strip()
        roi_path = manifest.parent / roi if roi else None  # an absolute path stays as it is
        try:
            jobs.append(SlideJob(path, float(mpp) if mpp else None, roi_path))
        except ValueError:
            raise SlideError(f"line {line}: slide_mpp {mpp!r} is not a number", manifest) from None
    return jobs


def versions() -> dict[str, str]:
    """Versions of wsi-espnet, Python and the libraries that shape the results (for run.json)."""
    found = {"wsi-espnet": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


@dataclass(frozen=True)
class RunRecord:
    """``run.json`` of one slide: provenance, parameters, tiles, timings and status.

    Written ``running`` when the slide is prepared, ``exporting`` before the exports and
    ``complete`` last, so a record that says complete always describes finished outputs.
    """

    fields: dict[str, Any]

    @classmethod
    def start(cls, job: SlideJob, output: SlideOutput, provenance: dict[str, Any]) -> RunRecord:
        """A new record; ``provenance`` holds model, parameters, slide_metadata, tiles, store_params."""
        return cls(
            {
                "status": "running",
                "slide": str(job.path.resolve()),
                "slide_file": slide_file_record(job.path),  # what a later run checks before skipping
                "output": str(output.root.resolve()),
                "versions": versions(),
                **provenance,
            }
        )

    @classmethod
    def read(cls, output: SlideOutput) -> RunRecord:
        """The record ``prepare`` wrote for this run (finalise continues it)."""
        fields = output.read_run()
        if fields is None:
            raise OutputError("run.json is missing; the slide was not prepared", output.root)
        return cls(fields)

    def resumed(self, resumed: bool, timings: dict[str, float]) -> RunRecord:
        """Whether the store was resumed from an earlier partial run, and the prepare timings."""
        return self.with_fields(resumed=resumed, timings=timings)

    def finished(self, processed: int, timings: dict[str, float], area_mm2: float) -> RunRecord:
        """The record of a slide whose statistics are written (status ``exporting``)."""
        tiles = {**self.fields["tiles"], "processed": processed}
        timings = {**self.fields.get("timings", {}), **timings}
        statistics = {"tissue_area_mm2": area_mm2}
        return self.with_fields(status="exporting", tiles=tiles, timings=timings, statistics=statistics)

    def with_fields(self, **fields: Any) -> RunRecord:
        return replace(self, fields={**self.fields, **fields})

    def write(self, output: SlideOutput) -> None:
        output.write_run(self.fields)


@dataclass(frozen=True)
class SlidePlan:
    """What the infer and finalise tasks of one slide need (small: no pixels but the mask).

    ``slide_mpp`` is the slide's effective level-0 resolution, resolved once when preparing;
    ``tissue`` covers the whole slide under ``--no-tissue-detection``, when ``mask_labels`` is
    False (labels outside the tissue mask are set to background only when it is True).
    """

    job: SlideJob
    output: SlideOutput
    grid: TileGrid
    mpp: float
    slide_mpp: float
    blocks: tuple[Block, ...]  # still to infer; each owns its chunks
    written: frozenset[tuple[int, int]]  # level-0 chunks already written (by an earlier run)
    levels: int  # the store's pyramid levels, level 0 included
    tissue: TissueMask
    mask_labels: bool
    roi: RoiRegions | None = None  # labels outside it are background (``--roi``)
    qc: SlideQc | None = None  # None: --qc off

    @property
    def n_todo(self) -> int:
        """Chunks still to infer (the progress bar's unit)."""
        return sum(len(block.owned) for block in self.blocks)
