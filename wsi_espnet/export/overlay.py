"""A PNG a person can look at: the slide thumbnail with class colours blended over tissue, and a legend.

When the store has a confidence layer, a confidence view is drawn to the right of the class view
(:mod:`wsi_espnet.export.confidence_view`).

The labels come from the coarsest pyramid level that still covers the thumbnail's size, read
with a stride when even that level is much larger, so the whole overlay costs a few megabytes
whatever the slide size. Background (label 0) is left untouched so glass stays glass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from wsi_espnet.errors import OutputError
from wsi_espnet.export.confidence_view import legend_lines, with_confidence_view
from wsi_espnet.export.qc_layers import artifact_legend_lines, draw_artifacts
from wsi_espnet.export.resample import layer_at_size
from wsi_espnet.export.roi_views import OUTLINE_COLOR, draw_outline
from wsi_espnet.roi import read_output_roi
from wsi_espnet.store import SlideStore, open_store

ALPHA = 0.45
DEFAULT_SIDE = 1200  # px of the overlay's longer side when no thumbnail is given
LEGEND_WIDTH = 320
FONT_SIZE = 14
LINE = 22
SWATCH = 14
MARGIN = 10
AREA_UNIT = "mm^2"  # as QuPath writes it; Pillow's built-in font has no superscript two


def write_overlay(
    store: str | Path,
    path: str | Path,
    slide_thumbnail: np.ndarray | None = None,
    stats: dict[str, Any] | None = None,
) -> Path:
    """Write the overlay PNG: thumbnail (or white), classes blended over tissue, legend with areas."""
    image = render_overlay(open_store(store), slide_thumbnail, stats)
    path = Path(path)
    try:
        image.save(path, format="PNG", optimize=True)
    except OSError as error:
        raise OutputError(f"cannot write PNG ({error})", path) from error
    return path


def render_overlay(
    outputs: SlideStore, slide_thumbnail: np.ndarray | None, stats: dict[str, Any] | None
) -> Image.Image:
    """The overlay as a Pillow image; also embedded by the HTML report."""
    if slide_thumbnail is None:
        height, width = outputs.labels(0).shape
        factor = DEFAULT_SIDE / max(height, width)
        height, width = max(1, round(height * factor)), max(1, round(width * factor))
        base = np.full((height, width, 3), 255, np.uint8)
    else:
        base = np.asarray(slide_thumbnail, dtype=np.uint8)[..., :3]
        height, width = base.shape[:2]
    labels = labels_at_size(outputs, height, width)
    colors = np.zeros((256, 3), np.float32)
    for info in outputs.tissue_classes:
        colors[info.value] = info.color
    tissue = np.isin(labels, [c.value for c in outputs.tissue_classes])  # never background
    blended = base.astype(np.float32)
    blended[tissue] = (1 - ALPHA) * blended[tissue] + ALPHA * colors[labels[tissue]]
    blended = draw_artifacts(outputs, blended)
    picture = Image.fromarray(np.round(blended).astype(np.uint8), "RGB")
    roi = read_output_roi(outputs)
    if roi is not None:  # --roi: the region the slide was segmented in
        draw_outline(picture, roi, outputs.shape)
    picture = with_confidence_view(picture, outputs, tissue)
    return _with_legend(picture, outputs, stats, roi is not None)


def labels_at_size(outputs: SlideStore, height: int, width: int) -> np.ndarray:
    """The label map resampled (nearest) to ``height x width`` from the coarsest level that covers it."""
    labels = layer_at_size(outputs.labels, outputs.n_levels, height, width)
    assert labels is not None
    return labels


def _with_legend(
    picture: Image.Image, outputs: SlideStore, stats: dict[str, Any] | None, roi: bool = False
) -> Image.Image:
    """Place a legend panel (name, colour, area in mm²; the ROI outline) to the right of the picture."""
    areas = {int(row["label"]): float(row["area_mm2"]) for row in (stats or {}).get("classes", [])}
    lines = [(None, outputs.stem)]
    if stats and "tissue_area_mm2" in stats:
        lines.append((None, f"tissue {float(stats['tissue_area_mm2']):.3f} {AREA_UNIT}"))
    for info in outputs.tissue_classes:
        area = f"  {areas[info.value]:.3f} {AREA_UNIT}" if info.value in areas else ""
        lines.append((info.color, f"{info.name}{area}"))
    if roi:
        roi_area = (stats or {}).get("roi_area_mm2")
        lines.append((OUTLINE_COLOR, "ROI outline" + (f"  {roi_area:.3f} {AREA_UNIT}" if roi_area else "")))
    lines += legend_lines(outputs, stats)
    lines += artifact_legend_lines(stats)
    legend_height = 2 * MARGIN + LINE * len(lines)
    canvas = Image.new("RGB", (picture.width + LEGEND_WIDTH, max(picture.height, legend_height)), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=FONT_SIZE)
    x = picture.width + MARGIN
    for row, (color, text) in enumerate(lines):
        y = MARGIN + row * LINE
        if color is not None:
            draw.rectangle([x, y, x + SWATCH, y + SWATCH], fill=tuple(color), outline=(60, 60, 60))
        draw.text((x + SWATCH + 8, y), text, fill=(20, 20, 20), font=font)
    return canvas
