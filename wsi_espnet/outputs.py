"""Where one slide's results go, and the two small JSON/CSV records that describe a run.

``OUTDIR/<stem>/`` holds the store, statistics, exports, ``run.json`` (provenance and status) and
``.progress/`` (which chunks are safely written). ``OUTDIR/summary.csv`` has one row per slide.
``run.json`` is written atomically (temp file + rename) so an interrupted run never leaves a
record that claims to be complete.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SLIDE_SUFFIXES = (".ome.tiff", ".ome.tif")
SUMMARY_FIELDS = ("slide", "status", "error", "seconds", "tiles_processed", "tissue_area_mm2", "output")


def slide_stem(path: Path) -> str:
    """``CMU-1.ome.tif`` → ``CMU-1``: the name of the slide's output folder and files.

    A DICOM WSI folder keeps its whole name: its dots are not an extension (IDC names folders
    by series UID, ``1.2.826.0.1...``).
    """
    name = path.name
    if path.is_dir():
        return name
    for suffix in SLIDE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


@dataclass(frozen=True)
class SlideOutput:
    """Paths of one slide's outputs under ``OUTDIR/<stem>/``."""

    root: Path
    stem: str

    @classmethod
    def for_slide(cls, outdir: Path, slide: Path) -> SlideOutput:
        stem = slide_stem(slide)
        return cls(Path(outdir) / stem, stem)

    @property
    def store(self) -> Path:
        return self.root / f"{self.stem}.ome.zarr"

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def stats_json(self) -> Path:
        return self.root / f"{self.stem}.stats.json"

    @property
    def stats_csv(self) -> Path:
        return self.root / f"{self.stem}.stats.csv"

    @property
    def progress_dir(self) -> Path:
        return self.root / ".progress"

    def read_run(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.run_json.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def is_complete(self) -> bool:
        run = self.read_run()
        return bool(run and run.get("status") == "complete")

    def write_run(self, record: dict[str, Any]) -> None:
        write_json_atomic(self.run_json, record)

    def clear(self) -> None:
        """Remove a previous output (``--overwrite``, or a partial run with other parameters)."""
        if self.root.exists():
            shutil.rmtree(self.root)


def write_json_atomic(path: Path, record: Any) -> None:
    """Write JSON to a temporary file, then rename it into place: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    temp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(temp, path)


def write_summary(outdir: Path, rows: list[dict[str, Any]]) -> Path:
    """``OUTDIR/summary.csv``: slide, status (done/skipped/failed), error, seconds, tiles, area."""
    path = Path(outdir) / "summary.csv"
    temp = path.with_name(f".summary.{uuid.uuid4().hex}.tmp")
    with open(temp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temp, path)
    return path
