"""Artifacts painted onto real slide pixels for the QC tests: marker strokes, a defocused band, a fold."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import draw, morphology

#: Marker colours as they scan (blue, green, black and red marker on glass).
INKS = {"blue": (35, 70, 160), "green": (30, 120, 70), "black": (35, 35, 40), "red": (185, 35, 45)}
ALPHA = 0.7


def paint_strokes(image: np.ndarray, mpp: float, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One stroke per ink along a random walk (12 segments of 40-90 µm, 30-50 µm wide),
    alpha-blended onto ``image``; returns the painted copy and each ink's mask."""
    rng = np.random.default_rng(seed)
    height, width = image.shape[:2]
    out = image.astype(np.float32)
    masks = {}
    for name, ink in INKS.items():
        path = np.zeros((height, width), bool)
        y, x = rng.uniform(0.2 * height, 0.8 * height), rng.uniform(0.2 * width, 0.8 * width)
        angle = rng.uniform(0, 2 * np.pi)
        for _ in range(12):
            angle += rng.normal(0, 0.5)
            step = rng.uniform(40, 90) / mpp
            y2 = float(np.clip(y + step * np.sin(angle), 0, height - 1))
            x2 = float(np.clip(x + step * np.cos(angle), 0, width - 1))
            rows, cols = draw.line(int(y), int(x), int(y2), int(x2))
            path[rows, cols] = True
            y, x = y2, x2
        radius = round(rng.uniform(15, 25) / mpp)
        mask = ndimage.binary_dilation(path, morphology.disk(radius))
        out[mask] = (1 - ALPHA) * out[mask] + ALPHA * np.array(ink, np.float32)
        masks[name] = mask
    return np.round(out).astype(np.uint8), masks


def blur_band(image: np.ndarray, rows: slice, sigma_px: float) -> np.ndarray:
    """``image`` with a horizontal band Gaussian-blurred (defocus), blurred with its surroundings."""
    out = image.copy()
    lo, hi = max(rows.start - 64, 0), min(rows.stop + 64, image.shape[0])
    blurred = ndimage.gaussian_filter(image[lo:hi].astype(np.float32), (sigma_px, sigma_px, 0))
    out[rows] = np.round(blurred[rows.start - lo : rows.stop - lo]).astype(np.uint8)
    return out


def fold(image: np.ndarray, box: tuple[slice, slice], shift: tuple[int, int]) -> np.ndarray:
    """A fold: inside ``box`` the tissue lies over a shifted copy of itself, so the transmitted
    light multiplies (Beer-Lambert: optical densities add)."""
    out = image.astype(np.float32)
    under = np.roll(image, shift, axis=(0, 1)).astype(np.float32)
    out[box] = out[box] * under[box] / 255.0
    return np.round(out).astype(np.uint8)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0
