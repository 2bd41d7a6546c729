"""GeoJSON of the tissue classes, in the form QuPath 0.4-0.7 imports as locked, classified annotations.

Coordinates are level-0 slide pixels *as QuPath shows them*. QuPath's OpenSlide image server
crops a slide to ``openslide.bounds-x/y/width/height`` when the slide declares them (MIRAX and
some other formats; default since QuPath 0.2, ``--no-crop`` turns it off), so its pixel (0, 0) is
OpenSlide's level-0 pixel (bounds-x, bounds-y). The label map covers OpenSlide's full level-0
frame, so the bounds offset stored with the slide is subtracted (``subtract_bounds=True``).
Slides without bounds properties (SVS, generic TIFF, NDPI, OME-TIFF...) have offset (0, 0) and
are unaffected. Pass ``subtract_bounds=False`` for a viewer that shows the uncropped frame, such
as QuPath's Bio-Formats server.

How the geometry is made, memory-bounded:

1. each storage chunk of the label map is vectorised on its own (``rasterio.features.shapes``,
   4-connected, pixel-edge polygons in integer pixel coordinates);
2. the pieces of each class are unioned (shapely), which dissolves the chunk seams; memory is
   proportional to the length of the class boundaries, never to the slide area;
3. the classes are simplified *together* as a coverage (``shapely.coverage_simplify``) so
   neighbouring classes keep one shared boundary: no gaps, no overlaps. Edges are first
   segmentised to one vertex per pixel corner, because coverage simplification needs shared
   edges to carry identical vertices;
4. polygons smaller than ``min_area_um2`` are dropped, results are made valid and polygonal, and
   scaled to level-0 pixels rounded to 0.01 px (QuPath itself writes 2 decimals).

Label maps larger than ``MAX_VECTOR_SIDE`` pixels on a side are vectorised on the first coarser
pyramid level that fits: below the simplification tolerance the extra detail is not kept anyway,
and QuPath becomes sluggish with annotations of many millions of vertices.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import rasterio.features
import shapely
from affine import Affine
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon

from wsi_espnet.classes import BACKGROUND, ClassInfo
from wsi_espnet.errors import ConfigError, OutputError
from wsi_espnet.store import SlideStore, open_store

DEFAULT_MIN_AREA_UM2 = 100.0  # about a 10 µm x 10 µm speck: smaller than a few cells
DEFAULT_SIMPLIFY_PX = 1.0  # analysis pixels; removes the pixel staircase, keeps the shape
MAX_VECTOR_SIDE = 32_768  # analysis pixels; larger label maps are vectorised on a coarser level
COORDINATE_GRID = 0.01  # level-0 pixels


def write_geojson(
    output_dir_or_store: str | Path,
    path: str | Path,
    per_region: bool = False,
    min_area_um2: float = DEFAULT_MIN_AREA_UM2,
    simplify_px: float = DEFAULT_SIMPLIFY_PX,
    *,
    level: int | None = None,
    subtract_bounds: bool = True,
) -> Path:
    """Write a FeatureCollection with one locked annotation per class (or per connected region).

    ``simplify_px`` is the simplification tolerance in analysis pixels (0 keeps pixel edges);
    ``level`` forces a pyramid level (default: level 0 unless larger than ``MAX_VECTOR_SIDE``).
    A store without tissue gives a valid, empty FeatureCollection.
    """
    outputs = open_store(output_dir_or_store)
    if min_area_um2 < 0 or simplify_px < 0:
        raise ConfigError(f"min_area_um2 and simplify_px must be >= 0 (got {min_area_um2}, {simplify_px})")
    if level is None:
        level = outputs.finest_level_within(MAX_VECTOR_SIDE)
    elif not 0 <= level < outputs.n_levels:
        raise OutputError(
            f"has no pyramid level {level} (levels 0..{outputs.n_levels - 1})", outputs.store_path
        )
    geometries = class_geometries(outputs, level, simplify_px, min_area_um2, subtract_bounds)
    collection = feature_collection(geometries, outputs, per_region)
    path = Path(path)
    try:
        with path.open("w", encoding="utf-8") as file:
            json.dump(collection, file, allow_nan=False, ensure_ascii=False)
    except OSError as error:
        raise OutputError(f"cannot write GeoJSON ({error.strerror})", path) from error
    return path


def class_geometries(
    outputs: SlideStore, level: int, simplify_px: float, min_area_um2: float, subtract_bounds: bool
) -> dict[ClassInfo, MultiPolygon]:
    """Valid, non-overlapping MultiPolygons per class present, in QuPath's level-0 pixel frame."""
    known = {c.value: c for c in outputs.tissue_classes}
    min_area_px = min_area_um2 / outputs.level_mpp(level) ** 2
    vectors = _vectorise(outputs, level, min_area_px)
    unions = {value: geom for value, geom in vectors.items() if value in known}
    values = sorted(unions)
    coverage = [unions[v] for v in values]
    tolerance = simplify_px / 2**level
    if tolerance > 0 and coverage:
        coverage = list(shapely.coverage_simplify([shapely.segmentize(g, 1.0) for g in coverage], tolerance))
    factor = 2**level * outputs.scale
    dx, dy = outputs.bounds_offset if subtract_bounds else (0, 0)
    result: dict[ClassInfo, MultiPolygon] = {}
    for value, geom in zip(values, coverage, strict=True):
        kept = _polygonal(geom, min_area_px)
        if kept.is_empty:
            continue
        level0 = affinity.affine_transform(kept, [factor, 0, 0, factor, -dx, -dy])
        snapped = _polygonal(shapely.set_precision(level0, COORDINATE_GRID), 0.0)
        if not snapped.is_empty:
            result[known[value]] = snapped
    return result


def _vectorise(outputs: SlideStore, level: int, min_area_px: float) -> dict[int, shapely.Geometry]:
    """Per label value, its pixel polygons over all chunks, merged across chunk seams.

    Only polygons that touch their chunk's border can continue in a neighbouring chunk, so only
    those go through ``union_all`` (the expensive step: GEOS unions are super-linear in the
    number of parts). Polygons inside a chunk are complete regions already; those smaller
    than ``min_area_px`` are dropped before any geometry work, which keeps noisy maps fast.
    """
    inner: dict[int, list[shapely.Geometry]] = {}
    seam: dict[int, list[shapely.Geometry]] = {}
    for y0, x0, block in outputs.iter_label_chunks(level):
        tissue = block != BACKGROUND
        if not tissue.any():
            continue
        y1, x1 = y0 + block.shape[0], x0 + block.shape[1]
        for geometry, value in rasterio.features.shapes(
            block, mask=tissue, transform=Affine.translation(x0, y0)
        ):
            polygon = shapely.geometry.shape(geometry)
            left, top, right, bottom = polygon.bounds
            if left <= x0 or top <= y0 or right >= x1 or bottom >= y1:
                seam.setdefault(int(value), []).append(polygon)
            elif polygon.area >= min_area_px:
                inner.setdefault(int(value), []).append(polygon)
    merged = {}
    for value in set(inner) | set(seam):
        parts = list(inner.get(value, []))
        if value in seam:
            parts.extend(shapely.get_parts(shapely.union_all(seam[value])))
        merged[value] = shapely.MultiPolygon(parts)
    return merged


def _polygonal(geom: shapely.Geometry, min_area: float) -> MultiPolygon:
    """Make ``geom`` valid and keep only its polygons of at least ``min_area`` (lines, points dropped)."""
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    polygons: list[Polygon] = []
    stack = [geom]
    while stack:
        part = stack.pop()
        if isinstance(part, Polygon):
            if not part.is_empty and part.area >= min_area:
                polygons.append(part)
        elif part.geom_type in ("MultiPolygon", "GeometryCollection"):
            stack.extend(shapely.get_parts(part))
    result = MultiPolygon(polygons)
    if not result.is_valid:  # parts that touch along an edge after snapping: dissolve them
        result = _polygonal(shapely.union_all(polygons), min_area)
    return result


def feature_collection(
    geometries: dict[ClassInfo, MultiPolygon], outputs: SlideStore, per_region: bool
) -> dict[str, Any]:
    """QuPath-style features: ``objectType``, ``classification`` {name, color}, locked, measurements."""
    um2_per_px = outputs.slide_mpp**2
    stats = outputs.read_stats() or {}
    tissue_um2 = float(stats.get("tissue_area_mm2") or 0.0) * 1e6
    if not (math.isfinite(tissue_um2) and tissue_um2 > 0):
        tissue_um2 = sum(g.area for g in geometries.values()) * um2_per_px
    features = []
    for info, multipolygon in sorted(geometries.items(), key=lambda item: item[0].value):
        if per_region:
            parts = sorted(multipolygon.geoms, key=lambda p: -p.area)
            for index, polygon in enumerate(parts, start=1):
                features.append(_feature(info, polygon, f"{info.name} {index}", um2_per_px, tissue_um2))
        else:
            features.append(_feature(info, multipolygon, info.name, um2_per_px, tissue_um2))
    return {"type": "FeatureCollection", "features": features}


def _feature(
    info: ClassInfo, geom: Polygon | MultiPolygon, name: str, um2_per_px: float, tissue_um2: float
) -> dict[str, Any]:
    area_um2 = geom.area * um2_per_px
    fraction = area_um2 / tissue_um2 if tissue_um2 > 0 else 0.0
    return {
        "type": "Feature",
        "geometry": _geometry(geom),
        "properties": {
            "objectType": "annotation",
            "name": name,
            "classification": {"name": info.name, "color": list(info.color)},
            "isLocked": True,
            "measurements": {
                "Area µm^2": round(area_um2, 3),
                "Area mm^2": round(area_um2 / 1e6, 9),
                "Fraction of tissue": round(fraction, 6),
            },
        },
    }


def _geometry(geom: Polygon | MultiPolygon) -> dict[str, Any]:
    """GeoJSON geometry with RFC 7946 ring orientation and coordinates rounded to the snapping grid."""
    geom = shapely.orient_polygons(geom)

    def rings(polygon: Polygon) -> list[list[list[float]]]:
        return [
            np.round(shapely.get_coordinates(ring), 2).tolist()
            for ring in (polygon.exterior, *polygon.interiors)
        ]

    if isinstance(geom, Polygon):
        return {"type": "Polygon", "coordinates": rings(geom)}
    return {"type": "MultiPolygon", "coordinates": [rings(p) for p in geom.geoms]}
