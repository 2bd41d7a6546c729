"""The confidence view of the overlay: a second panel, beside the class view, coloured by confidence.

Tissue pixels take the viridis colour of their confidence (dark violet = the model is unsure,
yellow = sure), glass stays white, so the two panels line up pixel for pixel and a reader can see
which class regions the model is unsure of. Confidence comes from the coarsest pyramid level that
covers the panel (its 2x2-mean pyramid), read with a stride like the labels, so the view costs a
few megabytes whatever the slide size.

The colour map is viridis (perceptually uniform, readable in greyscale and by colour-blind
readers), interpolated from its published key colours: Pillow has no colour maps, and matplotlib
is not a dependency of this package for one 256-entry table.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from wsi_espnet.export.resample import layer_at_size
from wsi_espnet.store import SlideStore

GAP = 8  # white px between the class view and the confidence view
VIRIDIS_KEYS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
LEGEND_STEPS = (0.25, 0.5, 0.75, 1.0)


def viridis(values: np.ndarray) -> np.ndarray:
    """RGB uint8 of ``values`` in [0, 1] (any shape → shape + (3,))."""
    keys = np.asarray(VIRIDIS_KEYS, np.float32)
    at = np.linspace(0.0, 1.0, len(keys))
    v = np.clip(np.asarray(values, np.float32), 0.0, 1.0)
    rgb = [np.interp(v, at, keys[:, k]) for k in range(3)]
    return np.round(np.stack(rgb, axis=-1)).astype(np.uint8)


def confidence_at_size(outputs: SlideStore, height: int, width: int) -> np.ndarray | None:
    """The confidence (uint8) resampled (nearest) to ``height x width``, None without the layer."""
    return layer_at_size(outputs.confidence, outputs.n_levels, height, width)


def with_confidence_view(picture: Image.Image, outputs: SlideStore, tissue: np.ndarray) -> Image.Image:
    """``picture`` (the class view) with the confidence view to its right; unchanged without one.

    ``tissue`` is the class view's tissue mask (height x width), so both panels show the same pixels.
    """
    confidence = confidence_at_size(outputs, picture.height, picture.width)
    if confidence is None:
        return picture
    panel = np.full((picture.height, picture.width, 3), 255, np.uint8)
    panel[tissue] = viridis(confidence[tissue] / 255.0)
    canvas = Image.new("RGB", (2 * picture.width + GAP, picture.height), "white")
    canvas.paste(picture, (0, 0))
    canvas.paste(Image.fromarray(panel, "RGB"), (picture.width + GAP, 0))
    return canvas


def legend_lines(outputs: SlideStore, stats: dict[str, Any] | None) -> list[tuple[Any, str]]:
    """Legend rows of the confidence view: the colour scale, then mean confidence and uncertain share."""
    if outputs.confidence(0) is None:
        return []
    lines: list[tuple[Any, str]] = [(None, "right: confidence of the class")]
    lines += [(tuple(int(v) for v in viridis(np.array(step))), f"p = {step:.2f}") for step in LEGEND_STEPS]
    stats = stats or {}
    share, threshold = stats.get("uncertain_fraction_of_tissue"), stats.get("low_confidence_threshold")
    if share is not None and threshold is not None:
        lines.append((None, f"uncertain (p < {float(threshold):.2f}): {100 * float(share):.1f} % of tissue"))
    return lines
