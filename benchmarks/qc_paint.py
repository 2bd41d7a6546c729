"""Artifacts painted onto real slide pixels (QC tests and figures): marker strokes, defocus, a fold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage import draw

from wsi_espnet.qc import SlideQc, artifact_map, slide_qc
from wsi_espnet.slide import Slide
from wsi_espnet.tissue import detect_tissue

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
        # The path dilated by a disk of ``radius`` (``morphology.disk``: offsets with
        # dy² + dx² <= radius²) is every pixel that close to it: a distance transform gives
        # exactly that in linear time (a 100-px disk's dilation took minutes on CMU-1).
        mask = ndimage.distance_transform_edt(~path) <= radius
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


def fluorescence_image(size: int = 1024, seed: int = 0) -> np.ndarray:
    """A fluorescence-like RGB image: dark noisy background, bright green (FITC) and blue (DAPI) blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    pixels = rng.normal(8, 3, (size, size, 3))
    for _ in range(40):
        cy, cx = rng.uniform(100, size - 100, 2)
        radius = rng.uniform(10, 30)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
        pixels[..., 1 if rng.random() < 0.6 else 2] += 230 * blob
    return np.clip(pixels, 0, 255).astype(np.uint8)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def analyse(path: Path, mpp: float = 1.0, mode: str = "flag") -> tuple[np.ndarray, np.ndarray, SlideQc]:
    """What segment's prepare and infer see: the slide at ``mpp``, its refined tissue and QC plan."""
    with Slide.open(path) as slide:
        tissue = detect_tissue(slide)
        height, width = slide.analysis_shape(mpp)
        image = slide.read_region(0, 0, width, height, mpp)
        plan = slide_qc(slide, tissue, mpp, mode)
    return image, tissue.refine(image, 0, 0, mpp), plan


def flagged_fractions(path: Path, mpp: float = 1.0) -> tuple[dict[int, float], SlideQc]:
    """Share of the slide's tissue flagged per artifact value (1 pen, 2 blur, 3 fold)."""
    image, tissue, plan = analyse(path, mpp)
    found = artifact_map(image, mpp, plan.reference)[tissue]
    return {kind: float(np.mean(found == kind)) for kind in (1, 2, 3)}, plan
