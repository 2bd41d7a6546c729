"""Artifact QC in the inference pass: pen ink, out-of-focus regions and tissue folds, per block.

QC never reads the slide again. Each inference block's RGB window (analysis resolution, halo
included) is already in memory when its labels are written; :func:`artifact_map` turns it into
a uint8 map of the block core (0 none, 1 pen, 2 blur, 3 fold, :mod:`wsi_espnet.qc_kinds`).
The only slide-level knowledge a block needs, the slide's own reference sharpness and tissue
optical density, is estimated once in ``prepare`` from a handful of tissue tiles read at
analysis resolution (:func:`slide_qc`, :func:`estimate_reference`): under a second, and the
same pixels a block would see (a thumbnail has lost the fine detail that sharpness is measured on).

Everything is computed on a coarse grid of ``work_um`` cells (block means, aligned to the slide's
pixel grid so neighbouring blocks agree), except the Laplacian, which needs full resolution:

* **pen**: HSV colour rules on the cell means (blue, green, red marker; black: dark and grey),
  closed over a few µm and kept only in regions of at least ``pen_min_area_um2``. Marker strokes
  are hundreds of µm wide; tissue-marking dye (margin ink, specks of a few hundred µm² at the
  tissue edge) and single blue-stained nuclei stay below that size and are not flagged.
* **blur**: fine-scale energy (squared Laplacian) over the local contrast of the cells, both
  over ``sharpness_window_um``; a ratio below ``blur_ratio`` times the slide's reference is out
  of focus. The ratio, not the raw Laplacian, is used so that pale tissue is not taken for
  blurred tissue; windows with too little contrast, or with much glass, are not judged.
* **fold**: two layers of tissue absorb about twice the light of one: total optical density,
  smoothed over ``fold_smoothing_um``, above ``fold_od_ratio`` times the slide's median tissue
  density.

Pen wins over fold, fold over blur. Thresholds are :class:`QcSettings` (docs/qc.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from scipy import ndimage
from skimage import color, morphology

from wsi_espnet.classes import BACKGROUND
from wsi_espnet.qc_kinds import BLUR, FOLD, NONE, PEN
from wsi_espnet.slide import Slide
from wsi_espnet.tissue import TissueMask, tissue_pixels

MAX_FACTOR = 8  # block windows start on the 8-px grid (tile and halo are multiples of 8)
GLASS_SATURATION = 0.07  # as the tissue detector's floor
SAMPLE_TILES = 16  # tissue tiles read in prepare for the slide's reference (0.8 s on CMU-1)
SAMPLE_SIDE = 256  # analysis px: 256 µm at 1 µm/px, 64 sharpness windows a tile


@dataclass(frozen=True)
class QcSettings:
    """Thresholds of the detectors; areas in µm² and sizes in µm, so they hold at any mpp."""

    work_um: float = 4.0  # cell edge of the coarse grid the rules run on
    context_um: float = 128.0  # context around a block core: > smoothing, windows and a stroke's width
    blue_saturation: float = 0.38  # blue ink is at least this saturated (HSV, 0-1); stricter than
    green_saturation: float = 0.25  # green, since bluish haematoxylin shares its hue
    red_saturation: float = 0.45  # red ink; eosin is pinker (hue below 0.955) and blood rarely spans 5000 µm²
    black_value: float = 0.45  # black ink: darker than this (V) and greyer than black_saturation
    black_saturation: float = 0.35
    pen_closing_um: float = 8.0  # bridge the gaps of a stroke
    pen_min_area_um2: float = 5_000.0  # a marker stroke: e.g. 50 µm x 100 µm
    sharpness_window_um: float = 32.0  # the sharpness of a few cells
    blur_ratio: float = 0.3  # out of focus below this fraction of the slide's reference sharpness
    min_structure: float = 0.1  # judge focus only where contrast is at least this x the reference
    blur_max_glass: float = 0.4  # judge focus only in windows with at most this share of glass
    blur_opening_um: float = 8.0  # drop lines and specks of low sharpness before the area test
    blur_min_area_um2: float = 10_000.0  # a focus problem spans 100 µm or more
    fold_od_ratio: float = 2.2  # a fold: optical density at least this x the slide's tissue median
    fold_smoothing_um: float = 12.0  # Gaussian sigma: folds are wide, dense nuclei clusters are not
    fold_min_area_um2: float = 5_000.0
    flagged_warning: float = 0.5  # warn when more than this fraction of the tissue is flagged


@dataclass(frozen=True)
class QcReference:
    """What a block needs to know about its slide: reference sharpness and tissue density.

    ``bright_field`` is False for a slide with a dark background (fluorescence); ``hne_fraction``
    is the share of sampled tissue pixels with a pink-purple (H&E) hue. Either being off puts a
    warning in ``warnings``: the thresholds are made for bright-field H&E.
    """

    sharpness: float  # median fine-energy / contrast ratio of tissue cells
    structure: float  # median local contrast (variance of 4 µm cell means) of tissue
    tissue_od: float  # median total optical density of tissue cells
    bright_field: bool = True
    hne_fraction: float = 1.0
    tiles: int = 0
    warnings: tuple[str, ...] = ()

    def as_record(self) -> dict[str, Any]:
        return {**asdict(self), "warnings": list(self.warnings)}


@dataclass(frozen=True)
class SlideQc:
    """QC of one slide as the infer and finalise tasks see it (``SlidePlan.qc``)."""

    mode: str  # "flag" or "exclude" (no SlideQc at all for "off")
    reference: QcReference
    settings: QcSettings = field(default_factory=QcSettings)

    @property
    def excludes(self) -> bool:
        """Whether artifact pixels are removed from the classes: ``exclude`` on a bright-field slide."""
        return self.mode == "exclude" and not self.reference.warnings


def _factor(mpp: float, work_um: float) -> int:
    """Analysis pixels per QC cell: a power of two up to 8, so cells align across blocks."""
    factor = 1
    while factor * 2 <= min(work_um / mpp, MAX_FACTOR):
        factor *= 2
    return factor


def _block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor x factor`` cells (edge-padded to a multiple), as float32.

    Strided adds, not a reshape-and-sum: 10x faster, and no full-resolution float copy is made
    (uint8 sums of up to 8 x 8 pixels fit in uint16).
    """
    h, w = array.shape[:2]
    ph, pw = -h % factor, -w % factor
    if ph or pw:
        array = np.pad(array, [(0, ph), (0, pw)] + [(0, 0)] * (array.ndim - 2), mode="edge")
    accumulator = np.uint16 if array.dtype == np.uint8 else np.float32
    rows = array[0::factor].astype(accumulator)
    for dy in range(1, factor):
        rows += array[dy::factor]
    cells = rows[:, 0::factor].copy()
    for dx in range(1, factor):
        cells += rows[:, dx::factor]
    return cells.astype(np.float32) / np.float32(factor * factor)


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    """Total optical density (sum over R, G, B of -log10 transmission) of 0-255 pixels."""
    return -np.log10((rgb + 1.0) / 256.0).sum(axis=-1)


def _sharpness(rgb: np.ndarray, factor: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(fine energy / local contrast, local contrast) per coarse cell, over ``window`` cells.

    The green channel carries most of the H&E contrast. Fine energy: the squared Laplacian at
    full resolution; local contrast: the variance of the cell means within the window, i.e.
    structure of cells and larger, which defocus of a few µm barely changes while it removes
    the fine energy. Dividing by it keeps pale, low-contrast tissue from looking blurred.
    """
    green = rgb[..., 1].astype(np.float32)
    fine = ndimage.uniform_filter(_block_mean(ndimage.laplace(green) ** 2, factor), window)
    coarse = _block_mean(green, factor)
    mean = ndimage.uniform_filter(coarse, window)
    contrast = np.maximum(ndimage.uniform_filter(coarse**2, window) - mean**2, 0.0)
    return fine / (contrast + 1.0), contrast


def _pen(hsv: np.ndarray, settings: QcSettings) -> np.ndarray:
    """Marker ink by colour: blue, green, red (saturated) and black (dark and grey)."""
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    blue = (hue > 0.55) & (hue < 0.71) & (sat > settings.blue_saturation)
    green = (hue > 0.2) & (hue <= 0.55) & (sat > settings.green_saturation)
    red = ((hue > 0.955) | (hue < 0.03)) & (sat > settings.red_saturation) & (val > 0.5)
    dark = val < settings.black_value
    black = dark & (sat < settings.black_saturation) | (val < 0.3) & (sat < settings.black_saturation + 0.1)
    return blue | green | red | black


def _clean(mask: np.ndarray, min_area_px: int, closing_px: int = 0) -> np.ndarray:
    """Close small gaps, then drop regions below ``min_area_px`` cells."""
    if closing_px > 0:
        mask = ndimage.binary_closing(np.pad(mask, closing_px), morphology.disk(closing_px))[
            closing_px:-closing_px, closing_px:-closing_px
        ]
    return morphology.remove_small_objects(mask, max_size=max(min_area_px - 1, 0))


def _with_context(
    rgb: np.ndarray, core: tuple[slice, slice], margin: int
) -> tuple[np.ndarray, tuple[slice, slice]]:
    """The part of the window within ``margin`` px (a multiple of 8) of ``core``, and the core in it."""
    ys = slice(max(core[0].start - margin, 0), min(core[0].stop + margin, rgb.shape[0]))
    xs = slice(max(core[1].start - margin, 0), min(core[1].stop + margin, rgb.shape[1]))
    inner = (
        slice(core[0].start - ys.start, core[0].stop - ys.start),
        slice(core[1].start - xs.start, core[1].stop - xs.start),
    )
    return rgb[ys, xs], inner


def artifact_map(
    rgb: np.ndarray,
    mpp: float,
    reference: QcReference,
    settings: QcSettings | None = None,
    core: tuple[slice, slice] | None = None,
) -> np.ndarray:
    """uint8 artifact map (0 none, 1 pen, 2 blur, 3 fold) of the RGB window, or of its ``core``.

    ``rgb`` is an analysis-resolution window at ``mpp`` whose origin lies on the slide's 8-px
    grid (every inference window does); pass the whole window with its halo and the core slices,
    so that smoothing and region sizes near the core's edge see their neighbourhood.
    """
    settings = settings or QcSettings()
    if core is not None:  # only the core and the context its decisions need are processed
        rgb, core = _with_context(rgb, core, math.ceil(settings.context_um / mpp / 8) * 8)
    factor = _factor(mpp, settings.work_um)
    cell_um2 = (factor * mpp) ** 2
    cells = _block_mean(rgb, factor)
    hsv = color.rgb2hsv(cells / 255.0)
    pen = _clean(
        _pen(hsv, settings),
        math.ceil(settings.pen_min_area_um2 / cell_um2),
        round(settings.pen_closing_um / (factor * mpp)),
    )
    density = ndimage.gaussian_filter(_optical_density(cells), settings.fold_smoothing_um / (factor * mpp))
    fold = density > settings.fold_od_ratio * reference.tissue_od
    fold = _clean(fold & ~pen, math.ceil(settings.fold_min_area_um2 / cell_um2))
    window = max(1, round(settings.sharpness_window_um / (factor * mpp)))
    ratio, contrast = _sharpness(rgb, factor, window)
    # Glass has no focus to lose, and a window across a tissue edge has its contrast from the edge.
    glass = ndimage.uniform_filter((hsv[..., 1] < GLASS_SATURATION).astype(np.float32), window)
    glass = glass > settings.blur_max_glass
    judged = (contrast >= settings.min_structure * reference.structure) & ~glass
    blur = judged & (ratio < settings.blur_ratio * reference.sharpness) & ~pen & ~fold
    # An opening first, so that scattered low-sharpness cells do not hang on to a blurred region.
    blur = ndimage.binary_opening(blur, morphology.disk(round(settings.blur_opening_um / (factor * mpp))))
    blur = _clean(blur, math.ceil(settings.blur_min_area_um2 / cell_um2))
    out = np.full(cells.shape[:2], NONE, np.uint8)
    out[blur] = BLUR
    out[fold] = FOLD
    out[pen] = PEN
    full = np.repeat(np.repeat(out, factor, axis=0), factor, axis=1)[: rgb.shape[0], : rgb.shape[1]]
    return full[core] if core is not None else full


def estimate_reference(
    tiles: list[np.ndarray], mpp: float, tissue: list[np.ndarray], glass_value: float | None
) -> QcReference:
    """The slide's reference sharpness and tissue density from sample ``tiles`` and their ``tissue`` masks.

    ``glass_value`` is the median brightness (V, 0-1) of the tiles outside their tissue (None
    when there is too little of it to tell): a dark background means a fluorescence slide, whose
    colours would all look like ink. Medians, so a blurred or folded sample tile does not move
    the reference.
    """
    settings = QcSettings()
    factor = _factor(mpp, settings.work_um)
    window = max(1, round(settings.sharpness_window_um / (factor * mpp)))
    ratios, contrasts, densities, hne, n = [], [], [], [], 0
    for rgb, mask in zip(tiles, tissue, strict=True):
        cells = _block_mean(rgb, factor)
        inside = _block_mean(mask.astype(np.float32), factor) > 0.5
        if not inside.any():
            continue
        n += 1
        ratio, contrast = _sharpness(rgb, factor, window)
        ratios.append(ratio[inside])
        contrasts.append(contrast[inside])
        densities.append(_optical_density(cells)[inside])
        hue = color.rgb2hsv(cells / 255.0)[..., 0][inside]
        hne.append((hue > 0.7) | (hue < 0.05))
    if n == 0:
        return QcReference(1.0, 1.0, 1.0, tiles=0)
    bright = glass_value is None or glass_value > 0.5
    hne_fraction = float(np.concatenate(hne).mean())
    warnings = []
    if not bright:
        warnings.append(
            f"the slide background is dark (median brightness {glass_value:.2f}): not a bright-field "
            "slide (fluorescence?); artifact QC is made for H&E and its flags are not reliable here"
        )
    elif hne_fraction < 0.5:
        warnings.append(
            f"only {hne_fraction:.0%} of the sampled tissue has an H&E (pink-purple) hue; artifact QC "
            "is made for H&E and its flags are not reliable here"
        )
    return QcReference(
        sharpness=float(np.median(np.concatenate(ratios))),
        structure=float(np.median(np.concatenate(contrasts))),
        tissue_od=float(np.median(np.concatenate(densities))),
        bright_field=bright,
        hne_fraction=hne_fraction,
        tiles=n,
        warnings=tuple(warnings),
    )


def apply_qc(labels: np.ndarray, artifacts: np.ndarray, exclude: bool) -> tuple[np.ndarray, np.ndarray]:
    """(labels, artifacts) of one chunk as stored: artifacts only on labelled tissue, and with
    ``exclude`` those pixels set to background, so the classes lose exactly the flagged area."""
    flagged = np.where(labels != BACKGROUND, artifacts, NONE).astype(np.uint8)
    if exclude:
        labels = np.where(flagged != NONE, BACKGROUND, labels).astype(labels.dtype)
    return labels, flagged


def slide_qc(slide: Slide, tissue: TissueMask, mpp: float, mode: str) -> SlideQc:
    """The QC plan of one slide: its reference from ``SAMPLE_TILES`` tissue tiles read at ``mpp``.

    Tiles are centred on thumbnail tissue pixels spread over the slide (a fixed seed, so a rerun
    samples the same tiles). ``exclude`` on a slide whose colours are not bright-field H&E falls
    back to ``flag``, with a warning: removing most of a fluorescence slide's signal as "ink"
    would be worse than reporting it.
    """
    ys, xs = np.nonzero(tissue.mask)
    tiles, masks, glass = [], [], []
    if len(ys):
        rng = np.random.default_rng(0)
        ratio = tissue.mpp / mpp
        for i in np.sort(rng.choice(len(ys), size=min(SAMPLE_TILES, len(ys)), replace=False)):
            y0 = int((ys[i] + 0.5) * ratio) // 8 * 8 - SAMPLE_SIDE // 2  # on the 8-px grid, as blocks are
            x0 = int((xs[i] + 0.5) * ratio) // 8 * 8 - SAMPLE_SIDE // 2
            rgb = slide.read_region(x0, y0, SAMPLE_SIDE, SAMPLE_SIDE, mpp)
            if tissue.saturation_threshold is not None:
                inside = tissue.refine(rgb, y0, x0, mpp)
            else:  # --no-tissue-detection: the mask is everything, so tell tissue from glass here
                inside = tissue_pixels(rgb, tissue.settings.min_saturation, tissue.settings.max_dark_value)
            tiles.append(rgb)
            masks.append(inside)
            glass.append(rgb.max(axis=-1)[~inside] / 255.0)  # HSV value, without a full HSV conversion
    outside = np.concatenate(glass) if glass else np.zeros(0)
    glass_value = (
        float(np.median(outside)) if outside.size > 0.05 * SAMPLE_SIDE**2 * max(len(tiles), 1) else None
    )
    reference = estimate_reference(tiles, mpp, masks, glass_value)
    if mode == "exclude" and reference.warnings:
        warning = "--qc exclude was not applied (artifacts are only flagged) because of the warning above"
        reference = replace(reference, warnings=(*reference.warnings, warning))
        mode = "flag"
    return SlideQc(mode, reference)


def flagged_warning(artifacts: dict[str, Any], qc: SlideQc) -> str | None:
    """A warning when QC flags most of the tissue: its thresholds do not fit this slide."""
    fraction = sum(float(row["fraction_of_tissue"]) for row in artifacts.values())
    if fraction <= qc.settings.flagged_warning:
        return None
    return (
        f"artifact QC flagged {fraction:.0%} of the tissue: this is unlikely on an H&E slide; check the "
        "overlay (is the slide bright-field H&E?) before trusting the artifact areas"
    )


def qc_record(qc: SlideQc | None) -> dict[str, Any]:
    """run.json ``qc``: the mode applied, the slide's reference and the thresholds used."""
    if qc is None:
        return {"mode": "off"}
    return {"mode": qc.mode, "reference": qc.reference.as_record(), "settings": asdict(qc.settings)}
