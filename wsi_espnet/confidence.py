"""Per-pixel confidence: the probability of the class a pixel was given, as uint8 ``round(p * 255)``.

**Maximum softmax probability, not 1 - normalised entropy.** The label is the argmax, and the
argmax's probability is the number that decision rests on; it reads directly as "the model gives
this class p", and it is on the same scale as the stored per-class scores (the confidence of a
pixel is its label's score, within uint8 rounding), so a user can check one against the other.
Entropy also spends its range on how the *losing* classes share the rest: two pixels with the
same winner at p = 0.5 get different entropies depending on whether the other 0.5 sits on one
class or on seven, which says nothing about whether the label is right. Maximum softmax
probability is the standard baseline for spotting misclassified pixels (Hendrycks & Gimpel 2017),
and docs/training.md measures how pixel accuracy rises with it on the held-out Y-Net ROIs.

**With tissue-only labels** (``segment`` with tissue detection: the detector decides tissue
versus glass, the model only the class), the confidence is the chosen class's probability
*among the tissue classes*, ``p_c / (1 - p_background)``, computed stably as the softmax over
the tissue channels. The background probability is not part of that decision: counting it would
call a pixel the detector kept as tissue uncertain merely because it looks pale.

Where the tissue mask sets a pixel to background, and in chunks never written, the confidence is
0: a real confidence is at least 1 / (number of classes) > 0, so 0 always means "no prediction".
The value is computed in the predictor from the float probabilities (before the scores are
rounded to uint8) and stored in the store's ``confidence/`` image with its own pyramid: the 2x2
mean of the pixels that have a prediction, so glass (0) does not lower the tissue beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import zarr

from wsi_espnet.classes import BACKGROUND

if TYPE_CHECKING:  # the store imports this module; reading a store must not need torch
    import torch

CONFIDENCE_NAME = "confidence"
#: Pixels whose confidence is below this are "low confidence" (statistics) and "Uncertain"
#: (GeoJSON). Measured on the Y-Net ROIs (docs/training.md, "The --low-confidence default"):
#: below it a label is at best a coin toss (pixel accuracy 0.51 for the leave-one-out models,
#: 0.53 for the shipped model on its own training ROIs), and the model itself puts more
#: probability on the other classes together than on the one it chose.
DEFAULT_LOW_CONFIDENCE = 0.5
N_VALUES = 256


def confidence_u8(choice: torch.Tensor) -> torch.Tensor:
    """``round(max_c p_c * 255)`` (uint8, N×H×W) of probabilities ``choice`` (N×C×H×W, float)."""
    return choice.amax(1).mul_(255).round_().byte()


def masked(confidence: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``confidence`` where ``keep`` (a pixel the tissue mask kept), 0 (no prediction) elsewhere."""
    return np.where(keep, confidence, 0).astype(np.uint8, copy=False)


def below(confidence: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels whose stored confidence ``round(p * 255)`` is below probability ``threshold``."""
    return confidence < threshold * 255


@dataclass(frozen=True)
class ConfidenceSource:
    """What the statistics tasks read the confidence from: the level-0 array and the threshold."""

    array: zarr.Array
    threshold: float


@dataclass
class ConfidencePartial:
    """One chunk's confidence sums: per label value, the sum of uint8 confidence and low pixels."""

    sums: np.ndarray  # (256,) int64
    low: np.ndarray  # (256,) int64


def chunk_partial(source: ConfidenceSource, labels: np.ndarray, y0: int, x0: int) -> ConfidencePartial:
    """Sum one chunk's confidence per label value (``labels`` is the chunk's label block)."""
    h, w = labels.shape
    block = np.asarray(source.array[y0 : y0 + h, x0 : x0 + w])
    flat = labels.ravel()
    sums = np.bincount(flat, weights=block.ravel(), minlength=N_VALUES).astype(np.int64)
    low = np.bincount(flat[below(block.ravel(), source.threshold)], minlength=N_VALUES)
    return ConfidencePartial(sums, low.astype(np.int64))


def add_statistics(
    rows: list[dict], counts: np.ndarray, partials: list[ConfidencePartial | None], threshold: float
) -> dict:
    """Add ``mean_confidence`` and ``low_confidence_fraction`` to each class row (in place) and
    return the top-level keys ``uncertain_fraction_of_tissue`` and ``low_confidence_threshold``.

    ``counts`` is pixels per label value; every value is None for a store without confidence.
    """
    have = [p for p in partials if p is not None]
    if not have or len(have) != len(partials):
        for row in rows:
            row.update(mean_confidence=None, low_confidence_fraction=None)
        return {"uncertain_fraction_of_tissue": None, "low_confidence_threshold": float(threshold)}
    sums = sum(p.sums for p in have)
    low = sum(p.low for p in have)
    for row in rows:
        pixels = int(counts[row["label"]])
        value = row["label"]
        row["mean_confidence"] = float(sums[value]) / 255 / pixels if pixels else None
        row["low_confidence_fraction"] = int(low[value]) / pixels if pixels else 0.0
    tissue = int(counts.sum() - counts[BACKGROUND])
    uncertain = int(low.sum() - low[BACKGROUND])
    return {
        "uncertain_fraction_of_tissue": uncertain / tissue if tissue else 0.0,
        "low_confidence_threshold": float(threshold),
    }
