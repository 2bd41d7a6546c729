"""Artifact QC in the exports: GeoJSON regions (``Artifact: pen``, ...), overlay hatching, report table.

Reads the store's ``labels/artifacts`` layer (absent with ``--qc off`` or in older stores, when
every function here adds nothing). GeoJSON regions come from the same band-wise vectoriser as
the tissue classes, in the same pass (:class:`wsi_espnet.export.bands.BandVectoriser`), so
memory stays one band.
"""

from __future__ import annotations

from html import escape
from typing import Any

import numpy as np
from scipy import ndimage

from wsi_espnet.classes import ClassInfo
from wsi_espnet.export.resample import layer_at_size
from wsi_espnet.qc_kinds import FLAGGED, geojson_class
from wsi_espnet.store import SlideStore

HATCH = 6  # px between hatch lines in the overlay
AREA_UNIT = "mm^2"


def artifact_classes() -> dict[int, ClassInfo]:
    """The GeoJSON class (``Artifact: <kind>``) of each flagged value of the artifact layer."""
    return {kind.value: geojson_class(kind) for kind in FLAGGED}


def artifacts_at_size(store: SlideStore, height: int, width: int) -> np.ndarray | None:
    """The artifact map resampled (nearest) to ``height x width``, or None without QC."""
    return layer_at_size(store.artifacts, store.n_levels, height, width)


def draw_artifacts(store: SlideStore, picture: np.ndarray) -> np.ndarray:
    """Hatch each artifact kind in its colour and outline it, over the class overlay (float RGB)."""
    kinds = artifacts_at_size(store, *picture.shape[:2])
    if kinds is None or not kinds.any():
        return picture
    yy, xx = np.indices(kinds.shape)
    hatch = (yy + xx) % HATCH < 2
    for kind in FLAGGED:
        inside = kinds == kind.value
        if not inside.any():
            continue
        edge = inside & ~ndimage.binary_erosion(inside, iterations=2)
        picture[(inside & hatch) | edge] = kind.color
    return picture


def artifact_legend_lines(stats: dict[str, Any] | None) -> list[tuple[tuple[int, int, int] | None, str]]:
    """Overlay legend rows for the artifact kinds, with their areas (none without QC)."""
    table = (stats or {}).get("artifacts") or {}
    if not table:
        return []
    lines: list[tuple[tuple[int, int, int] | None, str]] = [(None, f"artifacts (QC {stats.get('qc')}):")]
    for kind in FLAGGED:
        row = table.get(kind.name, {})
        lines.append(
            (kind.color, f"{kind.name}  {float(row.get('area_mm2', 0.0)):.3f} {AREA_UNIT} (hatched)")
        )
    return lines


def report_section(stats: dict[str, Any] | None) -> str:
    """The report's artifact table: area and share of tissue per kind, and what the mode did."""
    table = (stats or {}).get("artifacts") or {}
    if not table:
        return "<p>Artifact QC was off for this run (<code>--qc off</code>).</p>"
    mode = str(stats.get("qc"))
    effect = (
        "Artifact pixels were removed from the tissue classes: the class areas above exclude them."
        if mode == "exclude"
        else "Artifacts are only flagged: the class areas above include them."
    )
    rows = []
    for kind in FLAGGED:
        row = table.get(kind.name, {})
        r, g, b = kind.color
        rows.append(
            f'<tr><td><span class="swatch" style="background: rgb({r}, {g}, {b})"></span>'
            f'{escape(kind.name)}</td><td class="num">{float(row.get("area_mm2", 0.0)):.4f}</td>'
            f'<td class="num">{100 * float(row.get("fraction_of_tissue", 0.0)):.2f}</td></tr>'
        )
    return (
        f"<p>QC mode <b>{escape(mode)}</b>. {effect} Hatched in the overlay; in the GeoJSON as "
        "<code>Artifact: &lt;kind&gt;</code>.</p>\n<table>\n<tr><th>artifact</th><th>area (mm²)</th>"
        "<th>% of tissue</th></tr>\n" + "\n".join(rows) + "\n</table>"
    )
