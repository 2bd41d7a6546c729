"""Tissue detection on a low-resolution thumbnail, and the tissue mask it produces.

Only chunks that touch tissue are sent through the network, so the mask decides most of the
run time on a typical biopsy slide (70-90 % glass).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
