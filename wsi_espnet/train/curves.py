"""``train_curves.png``: loss and validation mIoU per epoch, drawn with Pillow.

matplotlib is not a dependency (it would be the heaviest one for a single PNG), and two line
charts with a few dozen points need only lines, dots and labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

_W, _H, _PAD = 420, 300, 40
_COLOURS = {"encoder": (200, 90, 20), "decoder": (30, 90, 200)}


def _panel(draw: ImageDraw.ImageDraw, x0: int, title: str, points: Sequence[tuple[int, float, str]]) -> None:
    """One chart: ``points`` are (epoch index, value, stage); y axis from 0 to the maximum."""
    left, top, right, bottom = x0 + _PAD, _PAD, x0 + _W - 10, _H - _PAD
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw.text((left, 10), title, fill=(0, 0, 0))
    if not points:
        draw.text((left + 10, top + 10), "no data", fill=(120, 120, 120))
        return
    n = max(p[0] for p in points) or 1
    top_value = max(p[1] for p in points) or 1.0
    draw.text((x0 + 2, top - 6), f"{top_value:.2f}", fill=(0, 0, 0))
    draw.text((x0 + 2, bottom - 6), "0", fill=(0, 0, 0))
    draw.text((right - 40, bottom + 8), f"epoch {n}", fill=(0, 0, 0))

    def xy(i: int, v: float) -> tuple[float, float]:
        return left + (right - left) * i / n, bottom - (bottom - top) * v / top_value

    for stage, colour in _COLOURS.items():
        line = [xy(i, v) for i, v, s in points if s == stage]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for px, py in line:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
    draw.text((left + 8, bottom - 16), "encoder stage", fill=_COLOURS["encoder"])
    draw.text((left + 100, bottom - 16), "decoder stage", fill=_COLOURS["decoder"])


def plot_curves(rows: Sequence[dict], path: Path) -> None:
    """Write the two charts side by side from ``train_log.csv`` rows."""
    image = Image.new("RGB", (2 * _W, _H), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    loss = [(i + 1, float(r["loss"]), r["stage"]) for i, r in enumerate(rows)]
    miou = [
        (i + 1, float(r["val_miou"]), r["stage"])
        for i, r in enumerate(rows)
        if r.get("val_miou") not in (None, "")
    ]
    _panel(draw, 0, "training loss", loss)
    _panel(draw, _W, "validation mIoU", miou)
    image.save(path)
