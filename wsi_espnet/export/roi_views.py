"""The ROI in the human-facing exports: its outline on the overlay, its table in the report.

Both read what the result folder holds (``<stem>.roi.geojson`` via
:func:`wsi_espnet.roi.read_output_roi`, the ``roi`` rows of ``<stem>.stats.json``), so a later
``wsi-espnet export`` draws the ROI the slide was segmented in, whatever became of the user's file.
The outline is a colour no class uses and no H&E stain makes, so it reads on any slide.
"""

from __future__ import annotations

from html import escape
from typing import Any

from PIL import Image, ImageDraw
from shapely import get_parts

from wsi_espnet.export.html_cells import number_cell
from wsi_espnet.roi_regions import RoiRegions

OUTLINE_COLOR = (255, 230, 0)
OUTLINE_WIDTH = 2


def draw_outline(picture: Image.Image, roi: RoiRegions, shape: tuple[int, int]) -> None:
    """Draw every ring of the ROI, in place, on ``picture`` that shows an analysis map of ``shape``."""
    sx, sy = picture.width / shape[1], picture.height / shape[0]
    draw = ImageDraw.Draw(picture)
    for annotation in roi.annotations:
        for polygon in get_parts(annotation.geometry):
            for ring in (polygon.exterior, *polygon.interiors):
                points = [(x * sx, y * sy) for x, y in ring.coords]
                draw.line(points, fill=OUTLINE_COLOR, width=OUTLINE_WIDTH, joint="curve")


def roi_table_html(stats: dict[str, Any] | None) -> str:
    """The report's per-ROI table (empty when the slide was segmented without ``--roi``)."""
    rows = (stats or {}).get("roi")
    if not rows:
        return ""
    classes = list(dict.fromkeys(name for row in rows for name in row.get("class_fractions", {})))
    header = "<th>#</th><th>annotation</th><th>class</th><th>area (mm²)</th><th>tissue (mm²)</th>"
    header += "".join(f"<th>% {escape(name)}</th>" for name in classes)
    body = []
    for row in rows:
        cells = [
            f"<td>{int(row.get('index', 0))}</td>",
            f"<td>{escape(str(row.get('name', '')))}</td>",
            f"<td>{escape(str(row.get('class') or 'unclassified'))}</td>",
            number_cell(row.get("area_mm2"), 4),
            number_cell(row.get("tissue_area_mm2"), 4),
        ]
        fractions = row.get("class_fractions", {})
        cells += [number_cell(100 * float(fractions.get(name, 0.0)), 1) for name in classes]
        body.append("<tr>" + "".join(cells) + "</tr>")
    area = float((stats or {}).get("roi_area_mm2", 0.0))
    r, g, b = OUTLINE_COLOR
    return (
        "<h2>Region of interest</h2>\n"
        f'<p><span class="swatch" style="background: rgb({r}, {g}, {b})"></span>'
        f"Segmented only inside the ROI ({area:.4f} mm², outlined on the overlay); statistics cover it "
        "alone. Overlapping annotations are each counted in full; class shares are of tissue.</p>\n"
        f"<table>\n<tr>{header}</tr>\n" + "\n".join(body) + "\n</table>"
    )
