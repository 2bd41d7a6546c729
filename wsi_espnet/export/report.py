"""One self-contained HTML page per slide: overlay, statistics, run parameters and model provenance.

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
from wsi_espnet.export.overlay import render_overlay
from wsi_espnet.store import SlideStore, open_store

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 4px 10px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #ccc; }
.swatch { display: inline-block; width: 1em; height: 1em; vertical-align: middle; margin-right: 6px; }
code { font-size: 90%; word-break: break-all; }
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
    """The report page as a string."""
    stats = outputs.read_stats()
    run = outputs.read_run()
    buffer = io.BytesIO()
    render_overlay(outputs, slide_thumbnail, stats).save(buffer, format="PNG", optimize=True)
    overlay = base64.b64encode(buffer.getvalue()).decode("ascii")
    title = escape(f"wsi-espnet report: {outputs.stem}")
    sections = [
        f"<h1>{title}</h1>",
        f'<img alt="class overlay" src="data:image/png;base64,{overlay}">',
        "<h2>Tissue classes</h2>",
        _statistics_table(outputs, stats),
        "<h2>Slide and model</h2>",
        _key_value_table(_provenance(outputs)),
        "<h2>Run parameters</h2>",
        _key_value_table(run) if run else f"<p>No run.json in {escape(str(outputs.directory))}.</p>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )


def _statistics_table(outputs: SlideStore, stats: dict[str, Any] | None) -> str:
    if not stats:
        return f"<p>No statistics ({escape(outputs.stats_path.name)} was not written).</p>"
    colors = {c.value: c.color for c in outputs.classes}
    rows = []
    for row in stats.get("classes", []):
        r, g, b = colors.get(int(row["label"]), (255, 255, 255))
        swatch = f'<span class="swatch" style="background: rgb({r}, {g}, {b})"></span>'
        rows.append(
            f"<tr><td>{swatch}{escape(str(row['name']))}</td>"
            f'<td class="num">{float(row["area_mm2"]):.4f}</td>'
            f'<td class="num">{100 * float(row["fraction_of_tissue"]):.1f}</td>'
            f'<td class="num">{int(row["regions"])}</td>'
            f'<td class="num">{float(row["largest_region_mm2"]):.4f}</td></tr>'
        )
    tissue = float(stats.get("tissue_area_mm2", 0.0))
    return (
        f"<p>Tissue area: {tissue:.4f} mm²</p>\n<table>\n"
        "<tr><th>class</th><th>area (mm²)</th><th>% of tissue</th><th>regions</th>"
        "<th>largest region (mm²)</th></tr>\n" + "\n".join(rows) + "\n</table>"
    )


def _provenance(outputs: SlideStore) -> dict[str, Any]:
    slide = outputs.attrs.get("slide", {})
    model = outputs.attrs.get("model", {})
    return {
        "slide": slide.get("path"),
        "slide size (level 0, px)": " x ".join(str(v) for v in slide.get("dimensions", [])),
        "slide resolution (µm/px)": outputs.slide_mpp,
        "analysis resolution (µm/px)": outputs.mpp,
        "model": model.get("name"),
        "model weights sha256": model.get("sha256"),
        "store": str(outputs.store_path),
        "status": outputs.attrs.get("status"),
    }


def _key_value_table(values: dict[str, Any]) -> str:
    rows = []
    for key, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        rows.append(f"<tr><th>{escape(str(key))}</th><td><code>{escape(text)}</code></td></tr>")
    return "<table>\n" + "\n".join(rows) + "\n</table>"
