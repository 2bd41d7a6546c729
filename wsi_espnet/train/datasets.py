"""Training data at the model card's analysis resolution: image/mask folders and QuPath slides.

Every source is reduced to the same thing, a list of :class:`Sample` (an RGB image and a label
map of equal size at the card's mpp, 255 = ignore), so augmentation, the loop and evaluation never
care where pixels came from. Resampling to the card's mpp happens once, here, because a model
only works at the resolution it was trained at.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import shapely
import torch
from PIL import Image
from rasterio.features import rasterize
from rasterio.transform import Affine
from shapely.geometry import box, shape

from wsi_espnet.errors import AnnotationError, ConfigError
from wsi_espnet.models.cards import ModelCard, Normalisation

if TYPE_CHECKING:  # the loop imports this module; the config type is only needed for annotations
    from wsi_espnet.train.loop import TrainConfig

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass
class Sample:
    """One training/evaluation region at analysis resolution.

    ``origin`` is the analysis-pixel (x, y) of the region's top-left corner in its slide (0, 0
    for a plain image), so tiles can be traced back to the slide.
    """

    name: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    labels: np.ndarray  # (H, W) uint8, class values or IGNORE_INDEX
    origin: tuple[int, int] = (0, 0)


def resample(image: np.ndarray, labels: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Scale an image (bilinear, antialiased) and its labels (nearest) by ``factor``.

    Labels use nearest neighbour because class values are categories, not intensities.
    """
    if abs(factor - 1.0) < 1e-6:
        return image, labels
    h, w = labels.shape
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    img = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=None))
    lab = np.asarray(Image.fromarray(labels).resize(size, Image.Resampling.NEAREST))
    return img, lab


def read_mask(path: Path, n_classes: int) -> np.ndarray:
    """A class-index mask: single channel, or RGB with R=G=B (as Y-Net masks are stored)."""
    mask = np.asarray(Image.open(path))
    if mask.ndim == 3:
        channels = mask[..., :3]
        if not (
            np.array_equal(channels[..., 0], channels[..., 1])
            and np.array_equal(channels[..., 0], channels[..., 2])
        ):
            raise ConfigError("RGB mask channels differ; masks must hold class values (R=G=B)", path)
        mask = channels[..., 0]
    mask = mask.astype(np.uint8)
    bad = np.setdiff1d(np.unique(mask), [*range(n_classes), IGNORE_INDEX])
    if bad.size:
        raise ConfigError(f"mask values {bad.tolist()} are not classes 0..{n_classes - 1} (or 255)", path)
    return mask


def parse_data_mpp(entries: Sequence[str]) -> tuple[float | None, dict[str, float]]:
    """``--data-mpp`` values: one number for every image, ``STEM=MPP`` pairs, or a CSV file.

    A CSV has columns ``stem,mpp``. Returns (default mpp or None, per-stem mpp).
    """
    default: float | None = None
    per_stem: dict[str, float] = {}
    for entry in entries:
        try:
            if "=" in entry:
                stem, value = entry.rsplit("=", 1)
                per_stem[stem] = float(value)
            elif Path(entry).suffix.lower() == ".csv":
                with open(entry, newline="") as fh:
                    per_stem.update({row["stem"]: float(row["mpp"]) for row in csv.DictReader(fh)})
            else:
                default = float(entry)
        except (ValueError, KeyError, OSError) as exc:
            raise ConfigError(
                f"--data-mpp {entry!r}: expected a number, STEM=MPP or a CSV (stem,mpp): {exc}"
            ) from exc
    if any(v <= 0 for v in [*per_stem.values(), *([default] if default is not None else [])]):
        raise ConfigError("--data-mpp values must be positive")
    return default, per_stem


def load_folder(images: Path, masks: Path, card: ModelCard, data_mpp: Sequence[str] = ()) -> list[Sample]:
    """Image/mask pairs with the same stem, resampled from their mpp to the card's mpp.

    Images without an mpp (no ``--data-mpp`` entry) are assumed to be at the card's mpp already.
    """
    default, per_stem = parse_data_mpp(data_mpp)
    paths = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ConfigError("no images (*.png, *.jpg, *.tif) found", images)
    unknown = set(per_stem) - {p.stem for p in paths}
    if unknown:
        raise ConfigError(f"--data-mpp names images that do not exist: {', '.join(sorted(unknown))}", images)
    samples = []
    for path in paths:
        mask_path = Path(masks) / f"{path.stem}.png"
        if not mask_path.is_file():
            raise ConfigError(f"no mask {mask_path.name} for image {path.name}", masks)
        image = np.asarray(Image.open(path).convert("RGB"))
        labels = read_mask(mask_path, card.n_classes)
        if labels.shape != image.shape[:2]:
            raise ConfigError(
                f"mask is {labels.shape[::-1]} but its image is {image.shape[1::-1]}", mask_path
            )
        mpp = per_stem.get(path.stem, default if default is not None else card.mpp)
        image, labels = resample(image, labels, mpp / card.mpp)
        samples.append(Sample(path.stem, image, labels))
    return samples


def _norm_name(name: str) -> str:
    return re.sub(r"[\s_\-]+", "_", name.strip().lower())


def _classification(feature: dict) -> str | None:
    """The class name of a QuPath feature (``classification`` dict in 0.2+, plain string earlier)."""
    props = feature.get("properties") or {}
    cls = props.get("classification")
    if isinstance(cls, dict):
        return cls.get("name")
    if isinstance(cls, str):
        return cls
    return None


def read_annotations(path: Path, card: ModelCard) -> list[tuple[shapely.Geometry, int]]:
    """Classified polygons from a QuPath GeoJSON export as (level-0 geometry, class value).

    Class names match the card's names ignoring case, spaces, hyphens and underscores
    ("Malignant epithelium" == ``malignant_epithelium``). Unclassified objects are skipped: in
    QuPath they are usually region outlines, not labels. An unknown class name is an error
    because silently dropping it would train on the wrong ground truth.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AnnotationError(f"cannot read GeoJSON: {exc}", path) from exc
    features = data.get("features", []) if isinstance(data, dict) else data
    if isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    lookup = {_norm_name(c.name): c.value for c in card.classes}
    result, unknown = [], set()
    for feature in features:
        name = _classification(feature)
        if name is None or not feature.get("geometry"):
            continue
        value = lookup.get(_norm_name(name))
        if value is None:
            unknown.add(name)
            continue
        geom = shape(feature["geometry"])
        if geom.geom_type in ("Polygon", "MultiPolygon") and not geom.is_empty:
            result.append((shapely.make_valid(geom), value))
    if unknown:
        raise AnnotationError(
            f"unknown class name(s) {', '.join(sorted(unknown))}; the model card's classes are "
            f"{', '.join(c.name for c in card.classes)}",
            path,
        )
    if not result:
        raise AnnotationError("no classified polygon annotations found", path)
    return result


def annotated_regions(
    annotations: Sequence[tuple[shapely.Geometry, int]], scale: float
) -> list[tuple[int, int, int, int]]:
    """Analysis-pixel boxes (x, y, w, h) covering the annotations: overlapping bounding boxes
    are merged so a slide with a few scattered annotations is read in a few small windows,
    never as one slide-sized image."""
    merged = shapely.unary_union([box(*g.bounds) for g, _ in annotations])
    parts = getattr(merged, "geoms", [merged])
    regions = []
    for part in sorted(parts, key=lambda p: (p.bounds[1], p.bounds[0])):
        x0, y0, x1, y1 = part.bounds
        ax, ay = int(np.floor(x0 / scale)), int(np.floor(y0 / scale))
        regions.append((ax, ay, int(np.ceil(x1 / scale)) - ax, int(np.ceil(y1 / scale)) - ay))
    return regions


def rasterise_region(
    annotations: Iterable[tuple[shapely.Geometry, int]], region: tuple[int, int, int, int], scale: float
) -> np.ndarray:
    """Labels of one analysis-pixel region; pixels outside every polygon are IGNORE_INDEX.

    Later features win where polygons overlap (QuPath exports parents before children).
    """
    x, y, w, h = region
    transform = Affine(scale, 0.0, x * scale, 0.0, scale, y * scale)  # analysis pixel → level-0
    shapes = [(g, v) for g, v in annotations]
    return rasterize(shapes, out_shape=(h, w), transform=transform, fill=IGNORE_INDEX, dtype="uint8")


def load_annotated_slides(
    slides: Sequence[Path], annotations: Sequence[Path], card: ModelCard, slide_mpp: float | None = None
) -> list[Sample]:
    """Annotated regions of slides (one GeoJSON per slide, paired in order) at the card's mpp."""
    from wsi_espnet.slide import Slide  # imported lazily: folder training needs no slide backend

    if len(slides) != len(annotations):
        raise ConfigError(f"{len(slides)} slides but {len(annotations)} annotation files; pair them in order")
    samples = []
    for slide_path, geojson in zip(slides, annotations, strict=True):
        shapes = read_annotations(Path(geojson), card)
        with Slide.open(slide_path, slide_mpp) as slide:
            scale = card.mpp / slide.mpp
            for i, region in enumerate(annotated_regions(shapes, scale)):
                x, y, w, h = region
                image = slide.read_region(x, y, w, h, card.mpp)
                labels = rasterise_region(shapes, region, scale)
                samples.append(Sample(f"{Path(slide_path).stem}#{i}", image, labels, (x, y)))
    return samples


def class_weights(samples: list[Sample], n_classes: int) -> torch.Tensor:
    """ESPNet's weights ``1 / ln(1.10 + p_c)`` from pixel frequencies (ignore pixels excluded)."""
    counts = np.zeros(n_classes, np.float64)
    for s in samples:
        counts += np.bincount(s.labels[s.labels != IGNORE_INDEX].ravel(), minlength=n_classes)[:n_classes]
    p = counts / max(counts.sum(), 1.0)
    return torch.tensor(1.0 / np.log(1.10 + p), dtype=torch.float32)


def data_normalisation(samples: list[Sample]) -> Normalisation:
    """Per-channel mean/std of the training images on the 0..1 scale."""
    pixels = np.concatenate([s.image.reshape(-1, 3) for s in samples]).astype(np.float64) / 255.0
    mean = tuple(round(float(v), 4) for v in pixels.mean(0))
    std = tuple(round(float(v), 4) for v in pixels.std(0))
    return Normalisation("RGB", 255.0, mean, std)  # type: ignore[arg-type]


def load_samples(config: TrainConfig, card: ModelCard) -> list[Sample]:
    samples: list[Sample] = []
    if config.images is not None and config.masks is not None:
        samples += load_folder(config.images, config.masks, card, config.data_mpp)
    if config.slides:
        samples += load_annotated_slides(config.slides, config.annotations, card, config.slide_mpp)
    return samples


def split_samples(samples: list[Sample], config: TrainConfig) -> tuple[list[Sample], list[Sample]]:
    """Validation samples by name (``--val``; a slide's name covers all its regions) or a seeded
    random fraction of the samples."""
    if config.val:
        wanted = set(config.val)
        val = [s for s in samples if s.name in wanted or s.name.split("#")[0] in wanted]
        missing = wanted - {s.name for s in val} - {s.name.split("#")[0] for s in val}
        if missing:
            raise ConfigError(f"--val names unknown samples: {', '.join(sorted(missing))}")
    else:
        n_val = round(len(samples) * config.val_fraction)
        order = np.random.default_rng(config.seed).permutation(len(samples))
        val = [samples[i] for i in sorted(order[:n_val])]
    val_ids = {id(s) for s in val}
    train = [s for s in samples if id(s) not in val_ids]
    if not train:
        raise ConfigError("no training samples left after the validation split")
    return train, val
