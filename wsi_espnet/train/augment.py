"""H&E augmentation for random training crops.

Slides differ in stain strength, scanner colour and section orientation, and five ROIs show
very little of that variation; these transforms simulate it. torchvision is not a dependency, so
the few photometric jitters (a handful of numpy lines each) are written here; stain jitter uses
scikit-image's colour deconvolution (``rgb2hed`` / ``hed2rgb``), the standard H&E approach.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from skimage.color import hed2rgb, rgb2hed

from wsi_espnet.train.datasets import IGNORE_INDEX, Sample

# Crops are retried this many times to find one with labelled pixels (sparse QuPath annotations).
_CROP_TRIES = 10


@dataclass(frozen=True)
class AugmentSettings:
    """Strengths of each jitter; ``AugmentSettings.off()`` keeps only the random crop."""

    scale: tuple[float, float] = (0.8, 1.25)
    flips: bool = True
    hed_sigma: float = 0.05
    hed_bias: float = 0.01
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1

    @classmethod
    def off(cls) -> AugmentSettings:
        return cls((1.0, 1.0), False, 0.0, 0.0, 0.0, 0.0, 0.0)


def random_crop(
    sample: Sample, crop: int, rng: np.random.Generator, scale: tuple[float, float] = (1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """A ``crop``x``crop`` window at a random zoom in ``scale``; regions smaller than the window
    are padded with white and IGNORE_INDEX so every crop in a batch has the same size."""
    zoom = float(np.exp(rng.uniform(np.log(scale[0]), np.log(scale[1]))))
    size = max(8, round(crop / zoom))
    image, labels = sample.image, sample.labels
    h, w = labels.shape
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=255)
        labels = np.pad(labels, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
        h, w = labels.shape
    for _ in range(_CROP_TRIES):
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        lab = labels[y : y + size, x : x + size]
        if (lab != IGNORE_INDEX).any():
            break
    img = image[y : y + size, x : x + size]
    if size != crop:
        img = np.asarray(Image.fromarray(img).resize((crop, crop), Image.Resampling.BILINEAR))
        lab = np.asarray(Image.fromarray(lab).resize((crop, crop), Image.Resampling.NEAREST))
    return img, lab


def flip_rotate(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One of the eight dihedral orientations: tissue sections have no canonical up."""
    k = int(rng.integers(0, 4))
    image, labels = np.rot90(image, k), np.rot90(labels, k)
    if rng.random() < 0.5:
        image, labels = image[:, ::-1], labels[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(labels)


def hed_jitter(image: np.ndarray, rng: np.random.Generator, sigma: float, bias: float) -> np.ndarray:
    """Scale and shift the haematoxylin, eosin and DAB optical densities (Tellez et al. 2018)."""
    hed = rgb2hed(image)
    hed = hed * rng.uniform(1 - sigma, 1 + sigma, 3) + rng.uniform(-bias, bias, 3)
    return (np.clip(hed2rgb(hed), 0, 1) * 255).round().astype(np.uint8)


def colour_jitter(image: np.ndarray, rng: np.random.Generator, settings: AugmentSettings) -> np.ndarray:
    """Brightness, contrast and saturation jitter (multiplicative, as in torchvision)."""
    x = image.astype(np.float32)
    x *= rng.uniform(1 - settings.brightness, 1 + settings.brightness)
    grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = grey.mean() + (x - grey.mean()) * rng.uniform(1 - settings.contrast, 1 + settings.contrast)
    grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    s = rng.uniform(1 - settings.saturation, 1 + settings.saturation)
    x = grey[..., None] + (x - grey[..., None]) * s
    return np.clip(x, 0, 255).round().astype(np.uint8)


def augment(
    sample: Sample, crop: int, rng: np.random.Generator, settings: AugmentSettings
) -> tuple[np.ndarray, np.ndarray]:
    """A random augmented crop: (image uint8 (crop, crop, 3), labels uint8 (crop, crop))."""
    image, labels = random_crop(sample, crop, rng, settings.scale)
    if settings.flips:
        image, labels = flip_rotate(image, labels, rng)
    if settings.hed_sigma or settings.hed_bias:
        image = hed_jitter(image, rng, settings.hed_sigma, settings.hed_bias)
    if settings.brightness or settings.contrast or settings.saturation:
        image = colour_jitter(image, rng, settings)
    return image, labels
