"""The "Uncertain" GeoJSON class: tissue whose confidence is below the low-confidence threshold.

Regions to review, exported like the tissue classes (locked, coloured, with area measurements,
specks under ``min_area_um2`` dropped) and through the same band-wise vectoriser, so memory stays
one band whatever the slide size. The vectoriser reads a label-like array; :class:`UncertainMask`
is one, computed band by band from the label map and the confidence image of the same level, so
the mask is never held whole.

Uncertain regions overlap the class annotations they lie on: a pixel keeps its class and is also
marked for review. The threshold is the one the statistics were computed with (their
``low_confidence_threshold``), so the GeoJSON and the statistics agree on what is uncertain.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from wsi_espnet.classes import BACKGROUND, ClassInfo
from wsi_espnet.confidence import below
from wsi_espnet.store import SlideStore

#: Its value is only a key inside the export (never a label value in the store); yellow is
#: free among the breast card's colours (and reads as "caution").
UNCERTAIN = ClassInfo(255, "Uncertain", (255, 215, 0))


class UncertainMask:
    """What :class:`~wsi_espnet.export.bands.BandVectoriser` reads: 1 where tissue is uncertain, else 0.

    Only the attributes the vectoriser uses (shape, chunking, slicing) are provided; every slice
    reads the same window of the label map and the confidence image.
    """

    def __init__(self, labels: zarr.Array, confidence: zarr.Array, threshold: float) -> None:
        self.labels, self.confidence, self.threshold = labels, confidence, threshold
        self.shape = labels.shape
        self.shards, self.chunks = labels.shards, labels.chunks

    def __getitem__(self, key: Any) -> np.ndarray:
        labels = np.asarray(self.labels[key])
        low = below(np.asarray(self.confidence[key]), self.threshold)
        return ((labels != BACKGROUND) & low).astype(np.uint8)


def uncertain_mask(store: SlideStore, level: int, threshold: float) -> UncertainMask | None:
    """The uncertain-tissue mask of ``level`` (value 1), None for a store without confidence."""
    confidence = store.confidence(level)
    return None if confidence is None else UncertainMask(store.labels(level), confidence, threshold)


def uncertain_threshold(store: SlideStore, default: float) -> float:
    """The statistics' ``low_confidence_threshold`` (what the run used), else ``default``."""
    value = (store.read_stats() or {}).get("low_confidence_threshold")
    return float(value) if isinstance(value, (int, float)) else float(default)
