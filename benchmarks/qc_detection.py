"""Detection figures of artifact QC on the real slides in ../shared/data (the numbers in docs/qc.md).

Pen IoU on CMU-1-Small-Region with painted strokes (three seeds), recall of a Gaussian-blurred
band and of a simulated fold, the share of tissue flagged on every unpainted slide (the SVS, its
two derived pyramids, the five Y-Net ROIs written as slides), the margin-dye share, and QC's
seconds per megapixel. Everything at the shipped card's 1 µm/px, as ``segment`` analyses.

    python -m benchmarks.qc_detection [--out qc-detection.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image
from skimage import color

from benchmarks.common import report
from benchmarks.qc_cost import SHARED_DATA
from benchmarks.qc_paint import (
    analyse,
    blur_band,
    flagged_fractions,
    fluorescence_image,
    fold,
    iou,
    paint_strokes,
)
from wsi_espnet.qc import artifact_map
from wsi_espnet.qc_kinds import BLUR, FOLD, PEN

MPP = 1.0
CMU1 = SHARED_DATA / "wsi_aperio_cmu1_small_region" / "CMU-1-Small-Region.svs"
PYRAMIDS = ("CMU-1-Small-Region.pyramid.tif", "CMU-1-Small-Region.pyramid.ome.tif")


def _cmu1_figures() -> dict[str, Any]:
    image, tissue, plan = analyse(CMU1, MPP)
    ref = plan.reference
    t0 = time.perf_counter()
    base = artifact_map(image, MPP, ref)
    seconds_per_mpx = (time.perf_counter() - t0) / (image.shape[0] * image.shape[1] / 1e6)
    pen = {}
    for seed in (0, 1, 2):
        painted, masks = paint_strokes(image, MPP, seed)
        found = artifact_map(painted, MPP, ref) == PEN
        truth = np.logical_or.reduce(list(masks.values()))
        recall = {ink: float(np.mean(found[mask])) for ink, mask in masks.items()}
        pen[f"seed {seed}"] = {"iou": iou(found, truth), "recall_per_ink": recall}
    band = slice(400, 800)
    inside = np.zeros(tissue.shape, bool)
    inside[band] = True
    blur = {}
    for sigma in (1.0, 2.0, 3.0, 4.0):
        found = artifact_map(blur_band(image, band, sigma / MPP), MPP, ref) == BLUR
        blur[f"sigma {sigma:g} um"] = float(np.mean(found[inside & tissue]))
    box, shift = (slice(900, 1100), slice(300, 700)), (60, 40)
    double = np.zeros(tissue.shape, bool)
    double[box] = True
    double &= tissue & np.roll(tissue, shift, axis=(0, 1))
    folded = artifact_map(fold(image, box, shift), MPP, ref) == FOLD
    hsv = color.rgb2hsv(image)
    dye = (hsv[..., 0] > 0.35) & (hsv[..., 0] < 0.6) & (hsv[..., 1] > 0.2) & tissue
    return {
        "reference": ref.as_record(),
        "pen": pen,
        "blur_band_recall": blur,
        "fold_recall": float(np.mean(folded[double])),
        "dye_fraction_of_tissue": float(np.count_nonzero(dye) / np.count_nonzero(tissue)),
        "dye_flagged_as_pen_px": int(np.count_nonzero(dye & (base == PEN))),
        "qc_seconds_per_megapixel": seconds_per_mpx,
    }


def _unpainted(workdir: Path) -> dict[str, Any]:
    slides = {"CMU-1-Small-Region.svs": CMU1}
    slides |= {name: SHARED_DATA / "wsi_derived_pyramids" / name for name in PYRAMIDS}
    for png in sorted((SHARED_DATA / "ynet_breast_biopsy" / "images").glob("*.png")):
        mpp = 0.25 * float(png.stem.rsplit("_", 1)[1])  # PROVENANCE.md's estimate
        path = workdir / f"{png.stem}.tif"
        pixels = np.asarray(Image.open(png).convert("RGB"))
        tifffile.imwrite(
            path, pixels, photometric="rgb", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER"
        )
        slides[png.name] = path
    out = {}
    for name, path in slides.items():
        fractions, plan = flagged_fractions(path, MPP)
        out[name] = {
            "flagged_fraction_of_tissue": sum(fractions.values()),
            "per_kind": {"pen": fractions[PEN], "blur": fractions[BLUR], "fold": fractions[FOLD]},
            "warnings": list(plan.reference.warnings),
        }
    return out


def _fluorescence(workdir: Path) -> dict[str, Any]:
    """What tissue detection and QC make of a fluorescence-like slide (0.5 µm/px, 512 µm square)."""
    path = workdir / "fluorescence.tif"
    tifffile.imwrite(
        path, fluorescence_image(), photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER"
    )
    image, tissue, plan = analyse(path, MPP)
    found = artifact_map(image, MPP, plan.reference)[tissue]
    return {
        "tissue_fraction_of_slide": float(tissue.mean()),
        "flagged_fraction_of_tissue": float(np.mean(found != 0)),
        "per_kind": {name: float(np.mean(found == kind)) for name, kind in (("pen", PEN), ("blur", BLUR))},
        "warnings": list(plan.reference.warnings),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    summary = __doc__.splitlines()[0]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.qc_detection", description=summary)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if not CMU1.exists():
        parser.error(f"{CMU1}: the shared data is not there")
    with tempfile.TemporaryDirectory(prefix="qc-detection-") as scratch:
        workdir = Path(scratch)
        result = {
            "cmu1": _cmu1_figures(),
            "unpainted": _unpainted(workdir),
            "fluorescence": _fluorescence(workdir),
        }
    report(result, args.out)
    return result


if __name__ == "__main__":
    main()
