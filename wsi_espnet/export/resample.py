"""One pyramid layer of a store at a thumbnail's size, for the overlay's panels."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import zarr
from PIL import Image


def layer_at_size(
    layer: Callable[[int], zarr.Array | None], n_levels: int, height: int, width: int
) -> np.ndarray | None:
    """``layer(level)`` resampled (nearest) to ``height x width`` from the coarsest level that
    covers it; None when the store has no such layer (``layer(0)`` is None)."""
    array = None
    for level in reversed(range(n_levels)):
        array = layer(level)
        if array is None:
            return None
        if array.shape[0] >= height and array.shape[1] >= width:
            break
    assert array is not None  # a store has at least one level
    step = max(1, min(array.shape[0] // height, array.shape[1] // width))
    coarse = np.asarray(array[::step, ::step])
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.NEAREST))
