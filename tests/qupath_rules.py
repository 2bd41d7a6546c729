"""What QuPath accepts when it imports GeoJSON objects, as a checker for tests.

The rules follow QuPath's own readers (``qupath-core``: ``PathObjectTypeAdapters``,
``ROITypeAdapters``, ``GsonTools.PathClassTypeAdapter``, 0.4-0.7):

* a ``FeatureCollection`` with a ``features`` list of ``Feature`` objects;
* ``geometry`` of a GeoJSON type QuPath parses (Point, MultiPoint, LineString, MultiLineString,
  Polygon, MultiPolygon, GeometryCollection), with finite [x, y] positions;
* ``objectType`` *inside* ``properties`` (one of QuPath's object types);
* ``classification``: a PathClass with ``name`` (or ``names`` since 0.6) and ``color`` as three
  ints 0..255, or the legacy form with a packed ``colorRGB`` int and nested ``parentClass``;
* ``measurements``: a flat {name: number} map of finite numbers (or the pre-0.4 list of
  {name, value});
* ``isLocked`` a boolean.

Stricter than QuPath where QuPath would silently produce something broken: polygon rings must be
closed with at least 4 positions and the geometry must be valid (JTS operations such as area or
intersection misbehave on invalid polygons).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import shapely
import shapely.geometry

GEOMETRY_TYPES = {
    "Point",
    "MultiPoint",
    "LineString",
    "MultiLineString",
    "Polygon",
    "MultiPolygon",
    "GeometryCollection",
}
OBJECT_TYPES = {"annotation", "detection", "cell", "tile", "tmaCore", "root"}
INT32 = (-(2**31), 2**31 - 1)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def check_feature_collection(obj: Any) -> list[str]:
    """Problems QuPath would have importing ``obj`` as a FeatureCollection (empty list: fine)."""
    if not isinstance(obj, dict) or obj.get("type") != "FeatureCollection":
        return ["top level is not a FeatureCollection"]
    features = obj.get("features")
    if not isinstance(features, list):
        return ["FeatureCollection has no 'features' list"]
    problems = []
    for index, feature in enumerate(features):
        problems += [f"feature {index}: {p}" for p in check_feature(feature)]
    return problems


def check_feature(feature: Any) -> list[str]:
    """Problems with one Feature."""
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        return ["not a Feature"]
    problems = check_geometry(feature.get("geometry"))
    if "objectType" in feature:
        problems.append("'objectType' must be inside 'properties'")
    properties = feature.get("properties")
    if not isinstance(properties, dict):
        return [*problems, "no 'properties' object"]
    object_type = properties.get("objectType")
    if object_type not in OBJECT_TYPES:
        problems.append(f"objectType {object_type!r} is not one of {sorted(OBJECT_TYPES)}")
    if "classification" in properties:
        problems += [f"classification: {p}" for p in check_path_class(properties["classification"])]
    if "isLocked" in properties and not isinstance(properties["isLocked"], bool):
        problems.append("isLocked is not a boolean")
    if "measurements" in properties:
        problems += check_measurements(properties["measurements"])
    if "id" in feature and not isinstance(feature["id"], str):
        problems.append("id is not a string")
    return problems


def check_path_class(obj: Any) -> list[str]:
    """Problems with a PathClass JSON (current ``name``/``names`` + ``color``, or legacy ``colorRGB``)."""
    if not isinstance(obj, dict):
        return ["not an object"]
    problems = []
    if "names" in obj:
        names = obj["names"]
        if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
            problems.append("'names' is not a non-empty list of strings")
    elif not (isinstance(obj.get("name"), str) and obj["name"]):
        problems.append("no 'name' string")
    if "color" in obj:
        color = obj["color"]
        if not (
            isinstance(color, list)
            and len(color) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in color)
        ):
            problems.append(f"color {color!r} is not three ints 0..255")
    elif "colorRGB" in obj:
        packed = obj["colorRGB"]
        if not (isinstance(packed, int) and INT32[0] <= packed <= INT32[1]):
            problems.append(f"colorRGB {packed!r} is not a packed 32-bit int")
    else:
        problems.append("no 'color' (or legacy 'colorRGB')")
    if "parentClass" in obj:
        problems += [f"parentClass: {p}" for p in check_path_class(obj["parentClass"])]
    return problems


def check_measurements(measurements: Any) -> list[str]:
    """Measurements must be a flat {str: finite number} (or the legacy list of {name, value})."""
    if isinstance(measurements, list):
        pairs = [
            (m.get("name"), m.get("value")) if isinstance(m, dict) else (None, None) for m in measurements
        ]
    elif isinstance(measurements, dict):
        pairs = list(measurements.items())
    else:
        return ["measurements is neither an object nor a list"]
    return [
        f"measurement {name!r}: {value!r} is not a finite number"
        for name, value in pairs
        if not (isinstance(name, str) and _is_number(value))
    ]


def _positions_ok(positions: Any, depth: int) -> bool:
    """Nested lists of ``depth`` levels ending in [x, y] or [x, y, z] finite numbers."""
    if depth == 0:
        return isinstance(positions, list) and len(positions) in (2, 3) and all(map(_is_number, positions))
    return isinstance(positions, list) and all(_positions_ok(p, depth - 1) for p in positions)


def _rings(polygon: list) -> list[str]:
    problems = []
    if not polygon:
        problems.append("polygon without rings")
    for ring in polygon:
        if len(ring) < 4:
            problems.append("ring with fewer than 4 positions")
        elif ring[0] != ring[-1]:
            problems.append("ring not closed")
    return problems


def check_geometry(geometry: Any) -> list[str]:
    """Problems with a GeoJSON geometry as QuPath reads it (type, nesting, closed rings, validity)."""
    if not isinstance(geometry, dict):
        return ["geometry is not an object"]
    kind = geometry.get("type")
    if kind not in GEOMETRY_TYPES:
        return [f"geometry type {kind!r} is not one QuPath reads"]
    if kind == "GeometryCollection":
        members = geometry.get("geometries")
        if not isinstance(members, list):
            return ["GeometryCollection without 'geometries'"]
        return [p for member in members for p in check_geometry(member)]
    depth = {
        "Point": 0,
        "MultiPoint": 1,
        "LineString": 1,
        "MultiLineString": 2,
        "Polygon": 2,
        "MultiPolygon": 3,
    }
    coordinates = geometry.get("coordinates")
    if not _positions_ok(coordinates, depth[kind]):
        return [f"{kind} coordinates are not nested lists of finite [x, y] positions"]
    polygons = [coordinates] if kind == "Polygon" else coordinates if kind == "MultiPolygon" else []
    problems = [p for polygon in polygons for p in _rings(polygon)]
    if problems:
        return problems
    shape = shapely.geometry.shape(geometry)
    if not shape.is_valid:
        problems.append(f"invalid geometry: {shapely.is_valid_reason(shape)}")
    return problems
