"""Where one slide's results go: the folder, its files, and the small JSON records in it.

``OUTDIR/<stem>/`` holds the store ``<stem>.ome.zarr`` (see ``store.py``), statistics
(``<stem>.stats.json``, ``.stats.csv``), with ``--roi`` the ROI (``<stem>.roi.geojson``) and its
table (``<stem>.roi.csv``), the exports, ``run.json`` (provenance and status) and
``.progress/`` (which chunks are safely written). ``OUTDIR/summary.csv`` has one row per slide.
Every JSON record is written atomically (temp file + rename) so an interrupted run never leaves
a record that claims to be complete. This module is the only one that knows these names, and it
imports nothing heavy, so configuration and exports can use it on any machine.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_espnet.errors import OutputError

OME_SUFFIXES = (".ome.tif", ".ome.tiff")
STORE_SUFFIX = ".ome.zarr"
#: The exports ``segment`` and ``export`` can write (names only: the writers live in ``export/``).
FORMATS = ("geojson", "ometiff", "png", "html")
SUMMARY_FIELDS = (
    "slide",
    "status",
    "error",
    "seconds",
    "tiles_processed",
    "tissue_area_mm2",
    "output",
    "warnings",
)


def slide_stem(path: Path) -> str:
    """The name of the slide's output folder and files: the file name minus its last extension.

    ``CMU-1.svs`` → ``CMU-1``, ``CMU-1.pyramid.tif`` → ``CMU-1.pyramid`` and
    ``CMU-1.pyramid.ome.tif`` → ``CMU-1.pyramid.ome`` (Python's ``Path.stem``): two containers of
    one slide never share a folder. Names that still meet (``X.svs`` and ``X.tif``) are caught by
    :func:`check_same_slide`. A DICOM WSI folder keeps its whole name: its dots are not an
    extension (IDC names folders by series UID, ``1.2.826.0.1...``).
    """
    return path.name if path.is_dir() else path.stem


def slide_file_record(path: Path) -> dict[str, Any]:
    """What identifies a slide file in run.json ``slide_file``: resolved path, size and mtime.

    A DICOM folder's size is the sum of its files and its mtime the newest of them.
    """
    path = Path(path).resolve()
    files = [f for f in path.iterdir() if f.is_file()] if path.is_dir() else [path]
    stats = [f.stat() for f in files]
    return {
        "path": str(path),
        "size": sum(s.st_size for s in stats),
        "mtime": max((s.st_mtime for s in stats), default=0.0),
    }


def check_same_slide(output: SlideOutput, slide: Path, overwrite: bool) -> None:
    """Refuse an output folder whose run.json was made from another slide file.

    Without this, ``X.svs`` run after ``X.tif`` would be "skipped, already complete" with the
    other file's results, or resume the other file's partial store. The same path with another
    size or mtime means the file changed: only ``--overwrite`` may replace its results.
    """
    run = output.read_run()
    if run is None:
        return
    recorded = run.get("slide_file") or {"path": run.get("slide")}
    current = slide_file_record(slide)
    if recorded.get("path") != current["path"]:
        raise OutputError(
            f"output folder {output.root} holds the results of {recorded.get('path')}; "
            "rename one slide or use another --output",
            slide,
        )
    changed = any(k in recorded and recorded[k] != current[k] for k in ("size", "mtime"))
    if changed and not overwrite:
        raise OutputError(
            f"the file changed since {output.root} was made from it (size or mtime differ); "
            "use --overwrite to redo it",
            slide,
        )


@dataclass(frozen=True)
class SlideOutput:
    """Paths of one slide's outputs under ``OUTDIR/<stem>/``, and its JSON records."""

    root: Path
    stem: str

    @classmethod
    def for_slide(cls, outdir: Path, slide: Path) -> SlideOutput:
        stem = slide_stem(slide)
        return cls(Path(outdir) / stem, stem)

    @classmethod
    def of_store(cls, store: Path) -> SlideOutput:
        """The folder a store ``<dir>/<stem>.ome.zarr`` belongs to."""
        return cls(Path(store).parent, Path(store).name[: -len(STORE_SUFFIX)])

    def file(self, suffix: str) -> Path:
        """``<root>/<stem><suffix>``, e.g. ``file(".geojson")``."""
        return self.root / f"{self.stem}{suffix}"

    @property
    def store(self) -> Path:
        return self.file(STORE_SUFFIX)

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def stats_json(self) -> Path:
        return self.file(".stats.json")

    @property
    def stats_csv(self) -> Path:
        return self.file(".stats.csv")

    @property
    def roi_geojson(self) -> Path:
        """The ROI the slide was segmented in, normalised (written only with ``--roi``)."""
        return self.file(".roi.geojson")

    @property
    def roi_csv(self) -> Path:
        """One row per ROI annotation: area, tissue area and class fractions."""
        return self.file(".roi.csv")

    @property
    def artifacts_csv(self) -> Path:
        """Artifact QC's areas per kind (``--qc flag|exclude``), apart from the class table."""
        return self.file(".artifacts.csv")

    @property
    def progress_dir(self) -> Path:
        return self.root / ".progress"

    def read_run(self) -> dict[str, Any] | None:
        """``run.json``, or None when absent; invalid JSON is an :class:`OutputError`."""
        return read_json(self.run_json)

    def read_stats(self) -> dict[str, Any] | None:
        """``<stem>.stats.json``, or None when statistics were not written."""
        return read_json(self.stats_json)

    def is_complete(self) -> bool:
        run = self.read_run()
        return bool(run and run.get("status") == "complete")

    def write_run(self, record: dict[str, Any]) -> None:
        write_json_atomic(self.run_json, record)

    def clear(self) -> None:
        """Remove a previous output (``--overwrite``, or a partial run with other parameters)."""
        if self.root.exists():
            shutil.rmtree(self.root)


def find_store(target: str | Path) -> Path:
    """Resolve ``<dir>/<stem>.ome.zarr``, ``<dir>/<stem>`` or a folder holding exactly one store."""
    target = Path(target)
    if target.name.endswith(STORE_SUFFIX) and target.is_dir():
        return target
    with_suffix = target.with_name(target.name + STORE_SUFFIX)
    if with_suffix.is_dir():
        return with_suffix
    if target.is_dir():
        stores = sorted(target.glob(f"*{STORE_SUFFIX}"))
        if len(stores) == 1:
            return stores[0]
        if stores:
            names = ", ".join(s.name[: -len(STORE_SUFFIX)] for s in stores)
            raise OutputError(f"holds several slide stores ({names}); name one as DIR/<stem>", target)
    raise OutputError(
        f"no {STORE_SUFFIX} store found (expected DIR/<stem> or DIR/<stem>{STORE_SUFFIX})", target
    )


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON record, or None when the file does not exist; unreadable JSON names the file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OutputError(f"not valid JSON ({error})", path) from error


def write_json_atomic(path: Path, record: Any) -> None:
    """Write JSON to a temporary file, then rename it into place: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    temp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(temp, path)


class ProgressLog:
    """Which chunks are safely on disk: one small JSON file per finished batch.

    A record is written atomically (:func:`write_json_atomic`), so a worker killed mid-write
    leaves no record and those chunks are simply redone.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def record(self, batch_id: str, chunk_indices: Iterable[Sequence[int]]) -> None:
        """Mark ``chunk_indices`` (iy, ix) as written; call after the batch's chunks are on disk."""
        indices = [[int(iy), int(ix)] for iy, ix in chunk_indices]
        write_json_atomic(self.directory / f"batch-{batch_id}.json", indices)

    def done(self) -> set[tuple[int, int]]:
        """All chunk indices recorded so far (empty when the directory does not exist yet)."""
        if not self.directory.is_dir():
            return set()
        chunks: set[tuple[int, int]] = set()
        for record in self.directory.glob("batch-*.json"):
            chunks.update((iy, ix) for iy, ix in json.loads(record.read_text()))
        return chunks


def write_summary(outdir: Path, rows: list[dict[str, Any]]) -> Path:
    """``OUTDIR/summary.csv``: slide, status (done/skipped/failed), error, seconds, tiles, area.

    Merged by slide: rows of earlier commands stay (a cohort run in parts keeps its whole
    record) and the slides of this command replace their old rows, in place.
    """
    path = Path(outdir) / "summary.csv"
    merged = {_summary_key(row): row for row in read_summary(path)}
    merged.update((_summary_key(row), row) for row in rows)
    temp = path.with_name(f".summary.{uuid.uuid4().hex}.tmp")
    with open(temp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SUMMARY_FIELDS, extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(merged.values())
    os.replace(temp, path)
    return path


def read_summary(path: Path) -> list[dict[str, str]]:
    """The rows of a ``summary.csv`` (empty when there is none yet)."""
    if not Path(path).is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise OutputError(f"cannot read the earlier summary ({error})", path) from error


def _summary_key(row: dict[str, Any]) -> str:
    return str(Path(str(row["slide"])).resolve())
