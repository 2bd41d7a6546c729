"""``python -m benchmarks.confidence_tta MODELS_DIR [--out FILE.json]``: the figures behind
``--low-confidence`` and ``--tta`` in docs/training.md, on the five real Y-Net ROIs.

``MODELS_DIR/<roi>/breast-tissue-espnet.yaml`` are the leave-one-out fold models (trained with
the documented command plus ``--val <roi>``). Three measurements, in one process, one torch
thread (the machine is shared; one thread is the steadiest rate):

* ``bins``: pixel accuracy per confidence bin, each fold model on its held-out ROI, labels and
  confidence as ``segment`` writes them inside tissue (tissue-only labels; the ROI's labelled
  non-background pixels stand in for the tissue mask), pooled over the five folds.
* ``loo``: mIoU and pixel accuracy of each fold on its held-out ROI with ``--tta`` 1, 2, 4 and 8
  (full argmax, one summed confusion matrix pooled, the metric code of ``wsi-espnet evaluate``).

Both in two geometries: ``whole``, each ROI one window padded with white only to a multiple of 8
(how the leave-one-out table of docs/training.md was first measured), and ``evaluate``, the
tiling of today's ``wsi-espnet evaluate`` (tile 512, halo 256: a 384² ROI sits in a 1024² window
that is mostly white margin, which these models never saw in training).
* ``cost``: seconds per output MPx of ``infer_image`` (segment's tiling: tile 512, halo 256) on
  CMU-1-Small-Region at 1.0 µm/px with each ``--tta``, the best of two passes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import REAL_SLIDE, report
from wsi_espnet.models.cards import ModelCard, load_card
from wsi_espnet.predict import Predictor
from wsi_espnet.tiled import RunOptions, infer_image
from wsi_espnet.train.datasets import IGNORE_INDEX, load_folder
from wsi_espnet.train.evaluate import evaluate_model, metrics_from_confusion

YNET = REAL_SLIDE.parents[1] / "ynet_breast_biopsy"
DATA_MPP = (
    "1222_1_1200_4800_4=1.0",
    "1222_1_7200_3600_2=0.5",
    "1339_1_1000_9800_1.33=0.33",
    "1529_1_6000_3000_1.33=0.33",
    "2204_1_18400_11800_1.33=0.33",
)
EDGES = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0001)
TTAS = (1, 2, 4, 8)


def _folds(models: Path) -> list[tuple[ModelCard, Any]]:
    """(fold card, held-out sample) for every fold whose model exists."""
    out = []
    for spec in DATA_MPP:
        stem = spec.split("=")[0]
        card_path = models / stem / "breast-tissue-espnet.yaml"
        if card_path.is_file():
            card = load_card(str(card_path))
            out.append((card, next(s for s in _samples(card) if s.name == stem)))
    return out


def _samples(card: ModelCard) -> list[Any]:
    """The five ROIs and masks, resampled to the card's mpp as ``train`` and ``evaluate`` do."""
    return load_folder(YNET / "images", YNET / "masks", card, DATA_MPP)


def _geometry(name: str, image: np.ndarray) -> tuple[int, int]:
    """(tile, halo) of geometry ``name`` for ``image``: one window, or segment's tiling."""
    return (-(-max(image.shape[:2]) // 8) * 8, 0) if name == "whole" else (512, 256)


def confidence_bins(folds: list[tuple[ModelCard, Any]], geometry: str) -> dict[str, Any]:
    """Pixels and accuracy per confidence bin (tissue-only labels on labelled tissue pixels)."""
    right = np.zeros(len(EDGES) - 1, np.int64)
    total = np.zeros(len(EDGES) - 1, np.int64)
    for card, sample in folds:
        options = RunOptions(tissue_only=True)
        tile, halo = _geometry(geometry, sample.image)
        prediction = infer_image(sample.image, Predictor(card, "cpu"), tile, halo, options=options)
        keep = (sample.labels != IGNORE_INDEX) & (sample.labels != 0)
        p = prediction.confidence[keep] / 255.0
        ok = prediction.labels[keep] == sample.labels[keep]
        index = np.digitize(p, EDGES) - 1
        total += np.bincount(index, minlength=len(total))[: len(total)]
        right += np.bincount(index[ok], minlength=len(total))[: len(total)]
    rows = [
        {
            "bin": f"{lo:.1f}-{min(hi, 1.0):.1f}",
            "pixels": int(n),
            "share": float(n / total.sum()),
            "accuracy": float(r / n) if n else None,
            "accuracy_below_upper_edge": float(right[: i + 1].sum() / max(total[: i + 1].sum(), 1)),
        }
        for i, (lo, hi, n, r) in enumerate(zip(EDGES[:-1], EDGES[1:], total, right, strict=True))
    ]
    return {"rows": rows, "pixels": int(total.sum()), "accuracy": float(right.sum() / total.sum())}


def loo_with_tta(folds: list[tuple[ModelCard, Any]], geometry: str) -> dict[str, Any]:
    """Per fold and pooled mIoU / pixel accuracy for each ``--tta``."""
    result: dict[str, Any] = {}
    for tta in TTAS:
        pooled = None
        per_fold = {}
        for card, sample in folds:
            tile_halo = _geometry(geometry, sample.image)
            metrics = evaluate_model(card.build_model(), card, [sample], "cpu", tile_halo, tta=tta)
            per_fold[sample.name] = {"miou": metrics["miou"], "pixel_accuracy": metrics["pixel_accuracy"]}
            cm = np.asarray(metrics["confusion_matrix"])
            pooled = cm if pooled is None else pooled + cm
        names = [c.name for c in folds[0][0].classes]
        overall = metrics_from_confusion(pooled, names)
        result[str(tta)] = {
            "folds": per_fold,
            "pooled_miou": overall["miou"],
            "pooled_pixel_accuracy": overall["pixel_accuracy"],
            "pooled_iou": overall["iou"],
        }
    return result


def tta_cost(card: ModelCard) -> dict[str, Any]:
    """Seconds per output MPx for each ``--tta`` on CMU-1-Small-Region at the card's mpp."""
    from wsi_espnet.slide import Slide

    with Slide.open(REAL_SLIDE) as slide:
        height, width = slide.analysis_shape(card.mpp)
        image = slide.read_region(0, 0, width, height, card.mpp)
    predictor = Predictor(card, "cpu")
    infer_image(image[:512, :512], predictor)  # warm-up
    rates = {}
    for tta in TTAS:
        best = min(_timed(image, predictor, tta) for _ in range(2))
        rates[str(tta)] = best / (height * width / 1e6)
    return {"image": f"{width}x{height} at {card.mpp} µm/px", "seconds_per_mpx": rates}


def _timed(image: np.ndarray, predictor: Predictor, tta: int) -> float:
    t0 = time.perf_counter()
    infer_image(image, predictor, 512, 256, options=RunOptions(tta=tta))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", type=Path, help="folder of the leave-one-out fold models")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--sections", default="bins,loo,cost")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folds = _folds(args.models)
    sections = set(args.sections.split(","))
    result: dict[str, Any] = {"folds": [s.name for _, s in folds]}
    shipped = load_card("breast-tissue-espnet")  # trained on all five: fitting, not accuracy
    for geometry in ("whole", "evaluate"):
        if "bins" in sections:
            result[f"bins_{geometry}"] = confidence_bins(folds, geometry)
            on_training = [(shipped, s) for s in _samples(shipped)]
            result[f"bins_shipped_on_training_rois_{geometry}"] = confidence_bins(on_training, geometry)
        if "loo" in sections:
            result[f"loo_{geometry}"] = loo_with_tta(folds, geometry)
    if "cost" in sections:
        result["cost"] = tta_cost(load_card("breast-tissue-espnet"))
    report(result, args.out)


if __name__ == "__main__":
    main()
