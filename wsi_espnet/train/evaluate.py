"""Segmentation metrics from one global confusion matrix, over regions tiled as ``segment`` tiles.

IoU is computed once from the confusion matrix summed over every evaluated pixel, never as an
average of per-image or per-batch IoUs: averaging ratios over-weights small images and classes
that barely occur in some of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_espnet.config import SegmentSettings
from wsi_espnet.models.cards import ModelCard
from wsi_espnet.predict import Predictor
from wsi_espnet.tiled import RunOptions, infer_image
from wsi_espnet.train.datasets import IGNORE_INDEX, Sample


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) int64 counts, rows = true class, columns = predicted; IGNORE_INDEX pixels skipped."""
    truth, pred = np.asarray(truth).ravel(), np.asarray(pred).ravel()
    keep = truth != IGNORE_INDEX
    index = truth[keep].astype(np.int64) * n_classes + pred[keep].astype(np.int64)
    return np.bincount(index, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def metrics_from_confusion(cm: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Per-class IoU (None where a class is neither present nor predicted), mIoU over the
    classes that are, pixel accuracy and the matrix itself, as a JSON-able dict."""
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    iou = [float(t / u) if u > 0 else None for t, u in zip(tp, union, strict=True)]
    valid = [v for v in iou if v is not None]
    total = int(cm.sum())
    return {
        "classes": list(class_names),
        "iou": dict(zip(class_names, iou, strict=True)),
        "miou": float(np.mean(valid)) if valid else None,
        "pixel_accuracy": float(tp.sum() / total) if total else None,
        "pixels": total,
        "support": dict(zip(class_names, (int(v) for v in cm.sum(1)), strict=True)),
        "confusion_matrix": cm.tolist(),
    }


def predict_labels(
    model: nn.Module,
    card: ModelCard,
    image: np.ndarray,
    device: torch.device | str = "cpu",
    geometry: tuple[int, int] = (SegmentSettings.tile, SegmentSettings.halo),
    tta: int = 1,
) -> np.ndarray:
    """Argmax labels (H, W) uint8 of an RGB region at the model's mpp, tiled as ``segment`` tiles.

    ``geometry`` is (tile, halo), ``segment``'s defaults unless told otherwise. The region goes
    through :func:`wsi_espnet.tiled.infer_image`: the same chunk grid, block plan, halo and white
    margin as a slide, so a score measured here is a score of what ``segment`` writes; ``tta`` as
    ``segment --tta``.
    """
    tile, halo = geometry
    predictor = Predictor(card, str(device), model=model)
    return infer_image(image, predictor, tile, halo, options=RunOptions(tta=tta)).labels


def evaluate_model(
    model: nn.Module,
    card: ModelCard,
    samples: Sequence[Sample],
    device: torch.device | str = "cpu",
    geometry: tuple[int, int] = (SegmentSettings.tile, SegmentSettings.halo),
    *,
    tta: int = 1,
) -> dict[str, Any]:
    """Metrics of ``model`` over ``samples`` (only labelled pixels count), plus per-sample mIoU.

    Each sample is predicted as :func:`predict_labels` predicts it (``segment``'s tiling, and
    its ``--tta``)."""
    total = np.zeros((card.n_classes, card.n_classes), np.int64)
    per_sample = {}
    for sample in samples:
        predicted = predict_labels(model, card, sample.image, device, geometry, tta)
        cm = confusion_matrix(sample.labels, predicted, card.n_classes)
        per_sample[sample.name] = metrics_from_confusion(cm, [c.name for c in card.classes])["miou"]
        total += cm
    result = metrics_from_confusion(total, [c.name for c in card.classes])
    result["per_sample_miou"] = per_sample
    return result


def format_table(metrics: dict[str, Any]) -> str:
    """A plain-text table: IoU and ground-truth pixels per class, then mIoU and accuracy."""
    lines = [f"{'class':<24}{'IoU':>8}{'pixels':>12}"]
    for name in metrics["classes"]:
        iou = metrics["iou"][name]
        lines.append(f"{name:<24}{'-' if iou is None else f'{iou:.3f}':>8}{metrics['support'][name]:>12}")
    miou, acc = metrics["miou"], metrics["pixel_accuracy"]
    lines.append(f"{'mIoU':<24}{'-' if miou is None else f'{miou:.3f}':>8}")
    lines.append(f"{'pixel accuracy':<24}{'-' if acc is None else f'{acc:.3f}':>8}{metrics['pixels']:>12}")
    return "\n".join(lines)
