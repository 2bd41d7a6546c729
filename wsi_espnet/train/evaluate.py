"""Segmentation metrics from one global confusion matrix, and whole-region inference.

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

from wsi_espnet.models.cards import ModelCard, Normalisation
from wsi_espnet.train.datasets import IGNORE_INDEX, Sample

# Regions larger than this (per side, analysis px) are predicted tile by tile to bound memory.
MAX_WHOLE_SIDE = 2048
TILE_HALO = 64


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


@torch.no_grad()
def _logits(model: nn.Module, norm: Normalisation, image: np.ndarray, device: torch.device) -> torch.Tensor:
    x = norm.apply(torch.tensor(np.asarray(image, dtype=np.uint8))[None].to(device))
    return model(x)[0]


def predict_labels(
    model: nn.Module, norm: Normalisation, image: np.ndarray, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Argmax labels (H, W) uint8 of an RGB region at the model's mpp.

    The model pads to its stride itself. Regions larger than MAX_WHOLE_SIDE are cut into tiles
    predicted with a TILE_HALO context margin that is then discarded, so tile borders do not show.
    """
    device = torch.device(device)
    model.eval()
    h, w = image.shape[:2]
    if max(h, w) <= MAX_WHOLE_SIDE:
        return _logits(model, norm, image, device).argmax(0).byte().cpu().numpy()
    out = np.empty((h, w), np.uint8)
    step = MAX_WHOLE_SIDE - 2 * TILE_HALO
    for y in range(0, h, step):
        for x in range(0, w, step):
            y0, x0 = max(0, y - TILE_HALO), max(0, x - TILE_HALO)
            y1, x1 = min(h, y + step + TILE_HALO), min(w, x + step + TILE_HALO)
            pred = _logits(model, norm, image[y0:y1, x0:x1], device).argmax(0).byte().cpu().numpy()
            th, tw = min(step, h - y), min(step, w - x)
            out[y : y + th, x : x + tw] = pred[y - y0 : y - y0 + th, x - x0 : x - x0 + tw]
    return out


def evaluate_model(
    model: nn.Module, card: ModelCard, samples: Sequence[Sample], device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Metrics of ``model`` over ``samples`` (only labelled pixels count), plus per-sample mIoU."""
    total = np.zeros((card.n_classes, card.n_classes), np.int64)
    per_sample = {}
    for sample in samples:
        cm = confusion_matrix(
            sample.labels, predict_labels(model, card.normalisation, sample.image, device), card.n_classes
        )
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
