"""Tissue detection on a low-resolution thumbnail, and the tissue mask it produces.

Only chunks that touch tissue are sent through the network, so the mask decides most of the
run time on a typical biopsy slide (70-90 % glass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from skimage import color, filters, measure, morphology

from wsi_espnet.slide import Slide


@dataclass(frozen=True)
class TissueMask:
    """Boolean tissue mask and labelled tissue fragments at a coarse resolution ``mpp``.

    ``fragments`` labels each separate piece of tissue 1..N (0 = glass); the per-fragment
    statistics table is keyed by these ids.
    """

    mask: np.ndarray  # bool (h, w)
    fragments: np.ndarray  # int32 (h, w), 0 = no tissue
    mpp: float

    def _resample(self, array: np.ndarray, y0: int, x0: int, h: int, w: int, mpp: float) -> np.ndarray:
        """Nearest-neighbour lookup of ``array`` for an analysis window at ``mpp``."""
        ratio = mpp / self.mpp
        ys = np.floor((np.arange(y0, y0 + h) + 0.5) * ratio).astype(np.int64)
        xs = np.floor((np.arange(x0, x0 + w) + 0.5) * ratio).astype(np.int64)
        inside_y = (ys >= 0) & (ys < array.shape[0])
        inside_x = (xs >= 0) & (xs < array.shape[1])
        out = array[np.clip(ys, 0, array.shape[0] - 1)][:, np.clip(xs, 0, array.shape[1] - 1)]
        out = out.copy()
        out[~inside_y, :] = 0
        out[:, ~inside_x] = 0
        return out

    def region(self, y0: int, x0: int, h: int, w: int, mpp: float) -> np.ndarray:
        """The mask for the analysis-resolution window (y0, x0, h, w) at ``mpp`` (nearest)."""
        return self._resample(self.mask, y0, x0, h, w, mpp).astype(bool)

    def fragment_region(self, y0: int, x0: int, h: int, w: int, mpp: float) -> np.ndarray:
        """Fragment ids (int32) for the analysis-resolution window (y0, x0, h, w) at ``mpp``."""
        return self._resample(self.fragments, y0, x0, h, w, mpp)

    @property
    def n_fragments(self) -> int:
        return int(self.fragments.max()) if self.fragments.size else 0


@dataclass(frozen=True)
class TissueSettings:
    """How tissue is told from glass; sizes in µm so they mean the same at any thumbnail mpp.

    Tissue is where HSV saturation exceeds the Otsu threshold of the thumbnail's saturation,
    but never less than ``min_saturation`` (so an all-glass slide, whose Otsu threshold falls
    inside sensor noise, yields no tissue). Pixels darker than ``max_dark_value`` (V in HSV) are
    pen marks, folds or dirt, not stainable tissue, and are excluded; near-white glass is already
    excluded by its low saturation.
    """

    thumbnail_mpp: float = 16.0  # µm/px of the thumbnail the mask is computed on
    min_saturation: float = 0.07  # floor for the Otsu threshold on saturation (0-1)
    max_dark_value: float = 0.15  # V (0-1) below which a pixel is a dark artefact
    closing_radius_um: float = 32.0  # bridge gaps between cells of one fragment
    min_object_um2: float = 5_000.0  # drop specks smaller than this (≈ 70 µm square)
    min_hole_um2: float = 20_000.0  # fill holes smaller than this (small lumina, vessels)


def detect_tissue(slide: Slide, settings: TissueSettings | None = None) -> TissueMask:
    """Tissue mask and labelled fragments of ``slide`` on a thumbnail at ``settings.thumbnail_mpp``.

    A slide without tissue returns an empty mask (no error): deciding whether that is a
    problem is the caller's job.
    """
    settings = settings or TissueSettings()
    mpp = settings.thumbnail_mpp
    hsv = color.rgb2hsv(slide.thumbnail(mpp))
    saturation, value = hsv[..., 1], hsv[..., 2]
    threshold = settings.min_saturation
    if np.ptp(saturation) > 1e-6:  # Otsu is undefined on a constant image
        threshold = max(threshold, float(filters.threshold_otsu(saturation)))
    mask = (saturation > threshold) & (value > settings.max_dark_value)
    radius = round(settings.closing_radius_um / mpp)
    if radius > 0:
        mask = morphology.closing(mask, morphology.disk(radius))
    px_area = mpp * mpp
    mask = morphology.remove_small_objects(mask, max_size=math.floor(settings.min_object_um2 / px_area))
    mask = morphology.remove_small_holes(mask, max_size=math.floor(settings.min_hole_um2 / px_area))
    fragments = measure.label(mask, connectivity=2).astype(np.int32)
    return TissueMask(mask=mask, fragments=fragments, mpp=mpp)
