"""Artifact areas per kind for the statistics, their CSV, and QC's warnings for run.json.

Counted chunk by chunk from the stored ``labels/artifacts`` layer (one Dask task per written
chunk, like the class statistics), so memory stays one chunk. Artifacts are only stored on
labelled tissue (:func:`wsi_espnet.qc.apply_qc`), so a kind's ``fraction_of_tissue`` is of the
tissue *before* exclusion: the tissue area the statistics report, plus with ``--qc exclude``
the flagged area that was taken out of it.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask
import numpy as np
import zarr

from wsi_espnet.grid import Chunk
from wsi_espnet.qc import SlideQc, flagged_warning
from wsi_espnet.qc_kinds import FLAGGED
from wsi_espnet.store import SlideStore

CSV_COLUMNS = ("kind", "value", "pixels", "area_mm2", "fraction_of_tissue")


def _chunk_counts(artifacts: zarr.Array, chunk: Chunk) -> np.ndarray:
    """Pixels per artifact value in one stored chunk (one Dask task)."""
    block = np.asarray(artifacts[chunk.y0 : chunk.y0 + chunk.h, chunk.x0 : chunk.x0 + chunk.w])
    return np.bincount(block.ravel(), minlength=256)


def artifact_statistics(
    store: SlideStore, chunks: Sequence[Chunk], tissue_pixels: int, client: Any = None
) -> dict[str, Any]:
    """``{"qc": mode, "artifacts": {kind: {"pixels", "area_mm2", "fraction_of_tissue"}}}``.

    ``artifacts`` is empty for a store written without QC (``--qc off``, older stores).
    """
    mode, layer = store.qc_mode, store.artifacts(0)
    if layer is None:
        return {"qc": mode, "artifacts": {}}
    tasks = [dask.delayed(_chunk_counts, pure=True)(layer, chunk) for chunk in chunks]
    parts = dask.compute(*tasks, scheduler=client if client is not None else "threads")
    counts = sum(parts, np.zeros(256, np.int64))
    flagged = int(sum(counts[kind.value] for kind in FLAGGED))
    before = tissue_pixels + (flagged if mode == "exclude" else 0)
    px_mm2 = store.mpp**2 / 1e6
    table = {
        kind.name: {
            "value": kind.value,
            "pixels": int(counts[kind.value]),
            "area_mm2": int(counts[kind.value]) * px_mm2,
            "fraction_of_tissue": int(counts[kind.value]) / before if before else 0.0,
        }
        for kind in FLAGGED
    }
    return {"qc": mode, "artifacts": table}


def write_artifacts_csv(stats: dict[str, Any], path: Path) -> None:
    """``<stem>.artifacts.csv``: one row per kind; not written when QC was off."""
    table = stats.get("artifacts") or {}
    if not table:
        return
    with Path(path).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({"kind": kind, **row} for kind, row in table.items())


def qc_warnings(slide: Path, qc: SlideQc | None, stats: dict[str, Any]) -> tuple[str, ...]:
    """The slide's QC warnings (not H&E-like, most of the tissue flagged), each naming the slide."""
    if qc is None:
        return ()
    found = list(qc.reference.warnings)
    too_much = flagged_warning(stats.get("artifacts") or {}, qc)
    if too_much is not None:
        found.append(too_much)
    return tuple(f"{slide}: {warning}" for warning in found)
