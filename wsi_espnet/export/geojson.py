"""GeoJSON of the tissue classes, in the form QuPath 0.4-0.7 imports as locked, classified annotations.

Coordinates are level-0 slide pixels *as QuPath shows them*. QuPath's OpenSlide image server
crops a slide to ``openslide.bounds-x/y/width/height`` when the slide declares them (MIRAX and
some other formats; default since QuPath 0.2, ``--no-crop`` turns it off), so its pixel (0, 0) is
OpenSlide's level-0 pixel (bounds-x, bounds-y). The label map covers OpenSlide's full level-0
frame, so the bounds offset stored with the slide is subtracted (``Frame(subtract_bounds=True)``).
Slides without bounds properties (SVS, generic TIFF, NDPI, OME-TIFF...) have offset (0, 0) and
are unaffected. Pass ``frame=Frame(subtract_bounds=False)`` for a viewer that shows the uncropped frame, such
as QuPath's Bio-Formats server.

How the geometry is made, in time linear in the label map and memory bounded by one band
(:mod:`wsi_espnet.export.bands` has the details): the map is vectorised one chunk row at a time,
simplified there as a coverage (neighbouring classes keep one shared boundary, seams held
fixed), and each connected region is dissolved and written as soon as it closes. Regions smaller
than ``min_area_um2`` (specks) are dropped; the threshold and the area dropped per class are
stated in the file (collection member ``wsi_espnet`` and the ``Specks dropped mm^2`` measurement).
Coordinates are scaled to level-0 pixels and rounded to 0.01 px (QuPath itself writes 2 decimals).

The file is written as a stream, never held in memory: per-class polygons go to temporary files
next to the output, then the FeatureCollection is assembled from them into a temporary file that
is renamed over ``path``. Its first line is ``{"type": "FeatureCollection", "wsi_espnet": {...},
"features": [`` so :func:`read_summary` can read the summary without parsing the whole file.
One feature per class is split into parts of at most ``MAX_FEATURE_VERTICES`` vertices: QuPath
becomes sluggish with single annotations of millions of vertices.

Label maps larger than ``MAX_VECTOR_SIDE`` pixels on a side are vectorised on the first coarser
pyramid level that fits: below the simplification tolerance the extra detail is not kept anyway.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon

from wsi_espnet.classes import BACKGROUND, ClassInfo
from wsi_espnet.errors import ConfigError, OutputError
from wsi_espnet.export.bands import BandVectoriser, LabelLayer, use_processes
from wsi_espnet.export.geojson_file import CollectionWriter
from wsi_espnet.export.qc_layers import artifact_classes
from wsi_espnet.export.uncertain import UNCERTAIN, uncertain_mask
from wsi_espnet.roi import read_output_roi
from wsi_espnet.store import SlideStore, open_store

DEFAULT_MIN_AREA_UM2 = 100.0  # about a 10 µm x 10 µm speck: smaller than a few cells
DEFAULT_SIMPLIFY_PX = 1.0  # analysis pixels; removes the pixel staircase, keeps the shape
MAX_VECTOR_SIDE = 32_768  # analysis pixels; larger label maps are vectorised on a coarser level
COORDINATE_GRID = 0.01  # level-0 pixels
SUMMARY_KEY = "wsi_espnet"


@dataclass(frozen=True)
class Frame:
    """Which pixels the GeoJSON describes, and whether it adds the ``Uncertain`` class.

    ``level`` forces a pyramid level (default: level 0 unless larger than ``MAX_VECTOR_SIDE``);
    ``subtract_bounds=False`` keeps OpenSlide's uncropped frame (QuPath's Bio-Formats server).
    ``uncertain_below`` (a confidence threshold, 0-1) adds the class "Uncertain": tissue whose
    confidence is below it (:mod:`wsi_espnet.export.uncertain`); ``export_all`` sets it from
    the run's ``--low-confidence`` unless ``--no-uncertain``.
    """

    level: int | None = None
    subtract_bounds: bool = True
    uncertain_below: float | None = None


def write_geojson(
    output_dir_or_store: str | Path,
    path: str | Path,
    per_region: bool = False,
    min_area_um2: float = DEFAULT_MIN_AREA_UM2,
    simplify_px: float = DEFAULT_SIMPLIFY_PX,
    frame: Frame = Frame(),
) -> Path:
    """Write a FeatureCollection of locked annotations: per class (in parts), or per connected region.

    ``simplify_px`` is the simplification tolerance in analysis pixels (0 keeps pixel edges).
    A store without tissue gives a valid FeatureCollection without features.
    """
    outputs = open_store(output_dir_or_store)
    if min_area_um2 < 0 or simplify_px < 0:
        raise ConfigError(f"min_area_um2 and simplify_px must be >= 0 (got {min_area_um2}, {simplify_px})")
    level = outputs.finest_level_within(MAX_VECTOR_SIDE) if frame.level is None else frame.level
    if not 0 <= level < outputs.n_levels:
        raise OutputError(
            f"has no pyramid level {level} (levels 0..{outputs.n_levels - 1})", outputs.store_path
        )
    path = Path(path)
    level_px_um2 = outputs.level_mpp(level) ** 2
    factor = 2**level * outputs.scale
    dx, dy = outputs.bounds_offset if frame.subtract_bounds else (0, 0)
    transform = [factor, 0, 0, factor, -dx, -dy]
    settings = {
        "min_area_um2": min_area_um2,
        "simplify_px": simplify_px,
        "level": level,
        "level_mpp": outputs.level_mpp(level),
        "uncertain_below": frame.uncertain_below,
    }
    roi = read_output_roi(outputs)
    clip = None if roi is None else roi.at_level(level)  # --roi: outlines follow the drawn boundary
    if clip is not None:
        shapely.prepare(clip)
        settings["roi"] = outputs.output.roi_geojson.name
    layers = _layers(outputs, level, frame.uncertain_below)
    labels = layers[0][0]
    vectoriser = BandVectoriser(
        [array for array, _ in layers],
        simplify_px / 2**level,
        min_area_um2 / level_px_um2,
        processes=use_processes(labels.shape[0] * labels.shape[1]),
    )
    try:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
            # A per-region feature is written as its region closes, with its fraction of tissue;
            # per class, the fraction is only needed at the end, from the vectoriser's own count.
            tissue_um2 = _tissue_um2(outputs) if per_region else None
            writer = CollectionWriter(
                Path(scratch), outputs.slide_mpp**2, tissue_um2, per_region, min_area_um2
            )
            for index, region in vectoriser:
                info = layers[index][1].get(region.value)
                if info is None:
                    continue
                if region.pixels * level_px_um2 < min_area_um2:
                    writer.drop(info, region.pixels * level_px_um2)
                    continue
                geometry = region.geometry()
                if clip is not None and not clip.contains(geometry):
                    geometry = geometry.intersection(clip)
                geometry = level0_polygons(geometry, transform)
                if not geometry.is_empty:
                    writer.add(info, geometry)
            for (index, value), (count, pixels) in sorted(vectoriser.specks.items()):
                if (info := layers[index][1].get(value)) is not None:
                    writer.drop(info, pixels * level_px_um2, count)
            if writer.tissue_um2 is None:
                counted = vectoriser.nonzero[0] * level_px_um2 if level == 0 else None
                writer.tissue_um2 = _tissue_um2(outputs) if counted is None else counted
            staged = Path(scratch) / "collection.geojson"
            writer.assemble(staged, SUMMARY_KEY, settings)
            os.replace(staged, path)
    except OSError as error:
        raise OutputError(f"cannot write GeoJSON ({error.strerror or error})", path) from error
    return path


def needs_pyramid(shape: tuple[int, int]) -> bool:
    """Whether the default GeoJSON of a level-0 map of ``shape`` reads a coarser level (what
    ``write_geojson`` picks with ``finest_level_within(MAX_VECTOR_SIDE)``): finalise then
    runs it after the pyramid."""
    return max(shape) > MAX_VECTOR_SIDE


def _layers(
    outputs: SlideStore, level: int, uncertain: float | None
) -> list[tuple[LabelLayer, dict[int, ClassInfo]]]:
    """The layers to vectorise with the class of each exported value: the tissue classes, the
    ``Uncertain`` mask (below the ``uncertain`` threshold, when given) and QC's artifacts."""
    known = {c.value: c for c in outputs.tissue_classes}
    layers: list[tuple[LabelLayer, dict[int, ClassInfo]]] = [(outputs.labels(level), known)]
    mask = (
        None if uncertain is None or UNCERTAIN.value in known else uncertain_mask(outputs, level, uncertain)
    )
    if mask is not None:
        layers.append((mask, {1: UNCERTAIN}))
    artifacts = outputs.artifacts(level)
    if artifacts is not None:
        layers.append((artifacts, artifact_classes()))
    return layers


def read_summary(path: str | Path) -> dict[str, Any] | None:
    """The ``wsi_espnet`` summary on the first line of a GeoJSON written here (None for others)."""
    try:
        with Path(path).open(encoding="utf-8") as file:
            first = file.readline(1 << 20)
        summary = json.loads(first.rstrip() + "]}").get(SUMMARY_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return summary if isinstance(summary, dict) else None


def _tissue_um2(outputs: SlideStore) -> float:
    """Tissue area for ``Fraction of tissue``: non-background pixels of level 0, counted chunk by
    chunk (1.6 s on the 40x benchmark slide; a level-0 export counts them as it vectorises). It
    is the statistics' count, taken here rather than from stats.json so that the GeoJSON need
    not wait for the statistics."""
    pixels = sum(int(np.count_nonzero(block != BACKGROUND)) for _, _, block in outputs.iter_label_chunks(0))
    return pixels * outputs.level_mpp(0) ** 2


def level0_polygons(geometry: shapely.Geometry, transform: list[float]) -> MultiPolygon:
    """A region scaled to QuPath's level-0 frame, snapped to ``COORDINATE_GRID``, valid, polygonal."""
    level0 = affinity.affine_transform(geometry, transform)
    # Rounding each vertex is cheap and keeps shared boundaries shared (equal vertices round
    # equally); only where it makes a region invalid is the noding snap-rounding needed.
    rounded = shapely.set_precision(level0, COORDINATE_GRID, mode="pointwise")
    if rounded.is_valid and isinstance(rounded, Polygon | MultiPolygon):
        # checked once: the parts of a valid (multi)polygon are a valid MultiPolygon
        return rounded if isinstance(rounded, MultiPolygon) else MultiPolygon([rounded])
    if not rounded.is_valid:
        rounded = shapely.set_precision(level0, COORDINATE_GRID)
    return _polygonal(rounded)


def _polygonal(geom: shapely.Geometry) -> MultiPolygon:
    """Make ``geom`` valid and keep only its polygons (lines and points from snapping are dropped)."""
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    polygons: list[Polygon] = []
    stack = [geom]
    while stack:
        part = stack.pop()
        if isinstance(part, Polygon):
            if not part.is_empty and part.area > 0:
                polygons.append(part)
        elif part.geom_type in ("MultiPolygon", "GeometryCollection"):
            stack.extend(shapely.get_parts(part))
    result = MultiPolygon(polygons)
    if not result.is_valid:  # parts that touch along an edge after snapping: dissolve them
        result = _polygonal(shapely.union_all(polygons))
    return result
