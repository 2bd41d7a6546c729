"""One self-contained HTML page per slide: status, model caveat, overlay, statistics, run parameters.

The status shown is run.json's (the pipeline rewrites the report once the run is complete), and
the model caveat comes from the card block run.json carries (untrained, demo, evaluation
figures). run.json is rendered section by section as tables, never as raw JSON, and every field
may be missing: reports of older or interrupted runs still render. When the GeoJSON was written,
its speck threshold and the area it dropped per class are shown beside the statistics.

Self-contained so it can be mailed or archived with the case: the overlay is embedded as a
base64 PNG, the style is inline, and nothing is fetched from the network. Every value read
from the run's JSON files is HTML-escaped, since slide names and paths come from users.
"""

from __future__ import annotations

import base64
import io
import json
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from wsi_espnet.errors import OutputError
from wsi_espnet.export.geojson import read_summary
from wsi_espnet.export.html_cells import number_cell
from wsi_espnet.export.overlay import render_overlay
from wsi_espnet.export.qc_layers import report_section
from wsi_espnet.export.roi_views import roi_table_html
from wsi_espnet.store import SlideStore, open_store

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 4px 10px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #ccc; }
.swatch { display: inline-block; width: 1em; height: 1em; vertical-align: middle; margin-right: 6px; }
td { word-break: break-word; }
td table { margin: 0; }
.status.ok b { color: #15701a; }
.status.warn b, .caveat { color: #a04000; }
.caveat { border-left: 4px solid #a04000; padding: 4px 10px; background: #fff6ee; }
"""


def write_report(output_dir: str | Path, path: str | Path, slide_thumbnail: np.ndarray | None = None) -> Path:
    """Write the HTML report for the slide in ``output_dir`` (``OUTDIR/<stem>`` or the store)."""
    outputs = open_store(output_dir)
    page = render_report(outputs, slide_thumbnail)
    path = Path(path)
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as error:
        raise OutputError(f"cannot write HTML report ({error.strerror})", path) from error
    return path


def render_report(outputs: SlideStore, slide_thumbnail: np.ndarray | None) -> str:
    """The report page as a string; every section copes with missing files and fields."""
    stats = outputs.read_stats()
    run = outputs.read_run() or {}
    buffer = io.BytesIO()
    render_overlay(outputs, slide_thumbnail, stats).save(buffer, format="PNG", optimize=True)
    overlay = base64.b64encode(buffer.getvalue()).decode("ascii")
    title = escape(f"wsi-espnet report: {outputs.stem}")
    geojson = read_summary(outputs.directory / f"{outputs.stem}.geojson")
    sections = [
        f"<h1>{title}</h1>",
        _status(outputs, run),
        _model_caveat(run.get("model"), outputs.attrs.get("model")),
        f'<img alt="class overlay and confidence view" src="data:image/png;base64,{overlay}">',
        "<h2>Tissue classes</h2>",
        _statistics_table(outputs, stats, geojson),
        roi_table_html(stats),
        "<h2>Artifacts (QC)</h2>",
        report_section(stats),
        "<h2>Slide and model</h2>",
        _table(_provenance(outputs, run)),
        "<h2>Run parameters</h2>",
        _run_sections(run) if run else f"<p>No run.json in {escape(str(outputs.directory))}.</p>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )


def _status(outputs: SlideStore, run: dict[str, Any]) -> str:
    """The run's status as run.json states it (the store's own status when there is no run.json)."""
    status = str(run.get("status") or outputs.attrs.get("status") or "unknown")
    css = "ok" if status == "complete" else "warn"
    text = f'<p class="status {css}">Status: <b>{escape(status)}</b>'
    if status != "complete":
        text += " (the run had not finished when this report was written)"
    warnings = run.get("warnings")
    if isinstance(warnings, list) and warnings:
        text += "</p>\n<ul>" + "".join(f"<li>{escape(str(w))}</li>" for w in warnings) + "</ul>"
        return text
    return text + "</p>"


def _model_caveat(card: Any, store_model: Any) -> str:
    """What the model is and is not: untrained, demo, or a card's own evaluation figures."""
    card = card if isinstance(card, dict) else {}
    name = card.get("name") or (store_model or {}).get("name") or "unknown model"
    description = str(card.get("description") or "")
    lines = []
    if card.get("trained") is False:
        lines.append(
            f"Model <b>{escape(str(name))}</b> has untrained weights: the labels are not meaningful."
        )
    elif card.get("demo") or "demo" in description.lower() or "demo" in str(name).lower():
        lines.append(
            f"Model <b>{escape(str(name))}</b> is a demonstration model, not validated for diagnosis."
        )
    if description:
        lines.append(escape(description))
    evaluation = card.get("evaluation")
    if not lines and not evaluation:
        if "trained" not in card:
            return f'<p class="caveat">Model {escape(str(name))}: no model card information in run.json.</p>'
        return f"<p>Model {escape(str(name))} (trained).</p>"
    caveat = '<p class="caveat">' + "<br>".join(lines) + "</p>" if lines else ""
    if evaluation:
        caveat += "\n<h3>Model evaluation (from its card)</h3>\n" + _value_html(evaluation)
    return caveat


def _statistics_table(outputs: SlideStore, stats: dict[str, Any] | None, geojson: dict | None) -> str:
    if not stats:
        return f"<p>No statistics ({escape(outputs.stats_path.name)} was not written).</p>"
    colors = {c.value: c.color for c in outputs.classes}
    exported = {}
    if geojson:
        exported = {int(row["value"]): row for row in geojson.get("classes", []) if "value" in row}
    confidence = stats.get("uncertain_fraction_of_tissue") is not None
    rows = []
    for row in stats.get("classes", []):
        label = int(row.get("label", -1))
        r, g, b = colors.get(label, (255, 255, 255))
        swatch = f'<span class="swatch" style="background: rgb({r}, {g}, {b})"></span>'
        cells = [
            number_cell(row.get("area_mm2"), 4),
            number_cell(100 * float(row.get("fraction_of_tissue", 0.0)), 1),
            number_cell(row.get("regions"), 0),
            number_cell(row.get("largest_region_mm2"), 4),
        ]
        if geojson:
            kept = exported.get(label, {})
            cells += [
                number_cell(kept.get("area_mm2", 0.0), 4),
                number_cell(kept.get("specks_dropped_mm2", 0.0), 4),
            ]
        if confidence:
            cells += [
                number_cell(row.get("mean_confidence"), 3),
                number_cell(100 * _or0(row, "low_confidence_fraction"), 1),
            ]
        rows.append(f"<tr><td>{swatch}{escape(str(row.get('name', label)))}</td>" + "".join(cells) + "</tr>")
    header = (
        "<th>class</th><th>area (mm²)</th><th>% of tissue</th><th>regions</th><th>largest region (mm²)</th>"
    )
    note = ""
    if geojson:
        header += "<th>in GeoJSON (mm²)</th><th>specks dropped (mm²)</th>"
        threshold = float(geojson.get("min_area_um2", 0.0))
        note = (
            f"<p>The GeoJSON leaves out connected regions smaller than {threshold:g} µm² (specks); "
            "the two GeoJSON columns give what it keeps and what it drops per class.</p>\n"
        )
    if confidence:
        header += "<th>mean confidence</th><th>% low confidence</th>"
    tissue = float(stats.get("tissue_area_mm2", 0.0))
    note += confidence_note(stats)
    return (
        f"<p>Tissue area: {tissue:.4f} mm²</p>\n{note}<table>\n<tr>{header}</tr>\n"
        + "\n".join(rows)
        + "\n</table>"
    )


def confidence_note(stats: dict[str, Any]) -> str:
    """The uncertain share of the tissue and the threshold, as a paragraph ('' without confidence)."""
    share, threshold = stats.get("uncertain_fraction_of_tissue"), stats.get("low_confidence_threshold")
    if share is None or threshold is None:
        return ""
    return (
        f"<p>Uncertain: {100 * float(share):.1f} % of the tissue has a confidence below "
        f"{float(threshold):.2f} (the class's probability; right-hand panel of the overlay).</p>\n"
    )


def _or0(row: dict[str, Any], key: str) -> float:
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) else 0.0


def _provenance(outputs: SlideStore, run: dict[str, Any]) -> dict[str, Any]:
    slide = outputs.attrs.get("slide", {})
    model = outputs.attrs.get("model", {})
    card = run.get("model") if isinstance(run.get("model"), dict) else {}
    return {
        "slide": slide.get("path") or run.get("slide"),
        "slide size (level 0, px)": " x ".join(str(v) for v in slide.get("dimensions", [])),
        "slide resolution (µm/px)": outputs.slide_mpp,
        "analysis resolution (µm/px)": outputs.mpp,
        "model": model.get("name") or card.get("name"),
        "model trained": card.get("trained"),
        "model weights sha256": model.get("sha256") or card.get("weights_sha256"),
        "store": str(outputs.store_path),
    }


def _run_sections(run: dict[str, Any]) -> str:
    """run.json as readable tables: parameters first, then the other sections, each in its own table."""
    order = ["parameters", "tiles", "timings", "statistics", "slide_metadata", "versions"]
    skipped = {"status", "warnings", "model"}  # shown above
    keys = [k for k in order if k in run] + [k for k in run if k not in order and k not in skipped]
    scalars = {k: run[k] for k in keys if not isinstance(run[k], (dict, list))}
    parts = [_table(scalars)] if scalars else []
    for key in keys:
        if isinstance(run[key], (dict, list)):
            parts.append(f"<h3>{escape(key.replace('_', ' '))}</h3>\n{_value_html(run[key])}")
    classes = (run.get("model") or {}).get("classes") if isinstance(run.get("model"), dict) else None
    if classes:
        parts.append(f"<h3>model classes</h3>\n{_value_html(classes)}")
    return "\n".join(parts)


def _value_html(value: Any) -> str:
    """A JSON value as HTML: scalars as text, lists of records as a table, mappings as nested tables."""
    if isinstance(value, dict):
        return _table(value) if value else "–"
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            columns = list(dict.fromkeys(k for v in value for k in v))
            head = "".join(f"<th>{escape(str(c))}</th>" for c in columns)
            body = "\n".join(
                "<tr>" + "".join(f"<td>{_value_html(v.get(c))}</td>" for c in columns) + "</tr>"
                for v in value
            )
            return f"<table>\n<tr>{head}</tr>\n{body}\n</table>"
        return escape(", ".join(_scalar(v) for v in value)) if value else "–"
    return escape(_scalar(value))


def _scalar(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _table(values: dict[str, Any]) -> str:
    rows = [
        f"<tr><th>{escape(str(key).replace('_', ' '))}</th><td>{_value_html(value)}</td></tr>"
        for key, value in values.items()
    ]
    return "<table>\n" + "\n".join(rows) + "\n</table>"
