"""Streamed writing of a QuPath FeatureCollection: features assembled from temporary files, never in memory.

Regions arrive in the order they close, classes interleaved. With one feature per class, each
class's polygons are appended to its own temporary file as JSON text, and a new *part* (a new
feature) starts whenever the current one would exceed ``MAX_FEATURE_VERTICES``. With one feature
per region, each region is written as a feature straight away. :meth:`CollectionWriter.assemble`
then writes the summary line and copies the features over, a megabyte at a time.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon

from wsi_espnet.classes import ClassInfo

MAX_FEATURE_VERTICES = 250_000  # QuPath stays responsive with annotations up to a few 100k vertices
COPY_BYTES = 1 << 20


@dataclass
class _Part:
    """One feature's worth of a class's polygons: a byte range of the class file and its totals."""

    start: int
    end: int = 0
    polygons: int = 0
    vertices: int = 0
    area_px: float = 0.0


@dataclass
class _Tally:
    """What was written and what was dropped for one class."""

    info: ClassInfo
    regions: int = 0
    area_px: float = 0.0  # level-0 px² of the exported geometry
    specks: int = 0
    speck_um2: float = 0.0
    parts: list[_Part] = field(default_factory=list)
    file: BinaryIO | None = None


class CollectionWriter:
    """Collects regions into temporary files under ``scratch`` and assembles the FeatureCollection."""

    def __init__(
        self,
        scratch: Path,
        um2_per_px: float,
        tissue_um2: float | None,
        per_region: bool,
        min_area_um2: float,
    ) -> None:
        self.scratch = scratch
        self.um2_per_px = um2_per_px  # level-0 µm² per level-0 px²
        #: for ``Fraction of tissue``: needed from the first region per region, else by :meth:`assemble`
        self.tissue_um2 = tissue_um2
        self.per_region = per_region
        self.min_area_um2 = min_area_um2
        self.tallies: dict[int, _Tally] = {}
        self.regions_file = (scratch / "regions.json").open("wb") if per_region else None
        self.features = 0

    def _tally(self, info: ClassInfo) -> _Tally:
        if info.value not in self.tallies:
            self.tallies[info.value] = _Tally(info)
        return self.tallies[info.value]

    def drop(self, info: ClassInfo, area_um2: float, count: int = 1) -> None:
        """Count specks that are not exported (``count`` of them, ``area_um2`` in all)."""
        tally = self._tally(info)
        tally.specks += count
        tally.speck_um2 += area_um2

    def add(self, info: ClassInfo, geometry: MultiPolygon) -> None:
        """Write one region (as one feature, or appended to its class's current part)."""
        tally = self._tally(info)
        tally.regions += 1
        tally.area_px += geometry.area
        polygons = list(geometry.geoms)
        if self.per_region:
            single = polygons[0] if len(polygons) == 1 else geometry
            name = f"{info.name} {tally.regions}"
            properties = self._properties(info, name, geometry.area * self.um2_per_px, None)
            self._write_feature(self.regions_file, _geometry_text(single), properties)
            return
        if tally.file is None:
            tally.file = (self.scratch / f"class-{info.value}.json").open("w+b")
        for polygon in polygons:
            text = json.dumps(_rings(polygon)).encode()
            vertices = int(shapely.get_num_coordinates(polygon))
            part = tally.parts[-1] if tally.parts else None
            if part is None or (part.polygons and part.vertices + vertices > MAX_FEATURE_VERTICES):
                part = _Part(start=tally.file.tell())
                tally.parts.append(part)
            elif part.polygons:
                tally.file.write(b",")
            tally.file.write(text)
            part.end = tally.file.tell()
            part.polygons += 1
            part.vertices += vertices
            part.area_px += polygon.area

    def _properties(self, info: ClassInfo, name: str, area_um2: float, specks_um2: float | None) -> dict:
        """QuPath properties: ``objectType``, ``classification`` {name, color}, locked, measurements."""
        measurements = {
            "Area µm^2": round(area_um2, 3),
            "Area mm^2": round(area_um2 / 1e6, 9),
            "Fraction of tissue": round(area_um2 / self.tissue_um2, 6) if self.tissue_um2 else 0.0,
            "Min region area µm^2": self.min_area_um2,
        }
        if specks_um2 is not None:
            measurements["Specks dropped mm^2"] = round(specks_um2 / 1e6, 9)
        return {
            "objectType": "annotation",
            "name": name,
            "classification": {"name": info.name, "color": list(info.color)},
            "isLocked": True,
            "measurements": measurements,
        }

    def _write_feature(self, out: BinaryIO, geometry_text: bytes, properties: dict) -> None:
        out.write(b",\n" if self.features else b"")
        out.write(b'{"type": "Feature", "geometry": ' + geometry_text + b', "properties": ')
        out.write(json.dumps(properties, ensure_ascii=False, allow_nan=False).encode() + b"}")
        self.features += 1

    def summary(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The collection-level record: settings, speck threshold, and per class what was kept or dropped."""
        classes = []
        for value in sorted(self.tallies):
            tally = self.tallies[value]
            classes.append(
                {
                    "value": value,
                    "name": tally.info.name,
                    "area_mm2": round(tally.area_px * self.um2_per_px / 1e6, 9),
                    "regions": tally.regions,
                    "specks_dropped": tally.specks,
                    "specks_dropped_mm2": round(tally.speck_um2 / 1e6, 9),
                    "features": len(tally.parts) if not self.per_region else tally.regions,
                    "max_feature_vertices": int(max((p.vertices for p in tally.parts), default=0)),
                }
            )
        note = (
            f"Connected regions smaller than {self.min_area_um2:g} µm² (specks) are not exported; "
            "their area per class is specks_dropped_mm2, so class areas here are smaller than in the "
            "statistics by that much."
        )
        return {**settings, "max_feature_vertices": MAX_FEATURE_VERTICES, "note": note, "classes": classes}

    def assemble(self, staged: Path, key: str, settings: dict[str, Any]) -> None:
        """Write the whole FeatureCollection to ``staged``: summary line first, then every feature."""
        summary = json.dumps(self.summary(settings), ensure_ascii=False, allow_nan=False)
        with staged.open("wb") as out:
            out.write(f'{{"type": "FeatureCollection", "{key}": {summary}, "features": [\n'.encode())
            if self.regions_file is not None:
                self.regions_file.close()
                with (self.scratch / "regions.json").open("rb") as regions:
                    shutil.copyfileobj(regions, out, COPY_BYTES)
            for value in sorted(self.tallies):
                self._write_class(out, self.tallies[value])
            out.write(b"\n]}\n")

    def _write_class(self, out: BinaryIO, tally: _Tally) -> None:
        """The class's parts as MultiPolygon features, named ``class`` or ``class (part i of n)``."""
        if tally.file is None:
            return
        for index, part in enumerate(tally.parts, start=1):
            name = (
                tally.info.name
                if len(tally.parts) == 1
                else f"{tally.info.name} (part {index} of {len(tally.parts)})"
            )
            properties = self._properties(tally.info, name, part.area_px * self.um2_per_px, tally.speck_um2)
            tally.file.seek(part.start)
            out.write(b",\n" if self.features else b"")
            out.write(b'{"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [')
            _copy_range(tally.file, out, part.end - part.start)
            out.write(b']}, "properties": ' + json.dumps(properties, ensure_ascii=False).encode() + b"}")
            self.features += 1
        tally.file.close()


def _copy_range(source: BinaryIO, out: BinaryIO, size: int) -> None:
    while size > 0:
        block = source.read(min(size, COPY_BYTES))
        if not block:
            break
        out.write(block)
        size -= len(block)


def _rings(polygon: Polygon) -> list[list[list[float]]]:
    """RFC 7946 ring orientation, coordinates rounded to the 0.01-px snapping grid."""
    polygon = shapely.orient_polygons(polygon)
    # All rings' points in one call (exterior first), split where the ring index changes: a
    # region with thousands of holes costs a few numpy calls, not a few per hole.
    coordinates, ring = shapely.get_coordinates(shapely.get_rings(polygon), return_index=True)
    points = np.round(coordinates, 2).tolist()
    ends = [*(np.flatnonzero(np.diff(ring)) + 1).tolist(), len(points)]
    return [points[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)]


def _geometry_text(geometry: Polygon | MultiPolygon) -> bytes:
    if isinstance(geometry, Polygon):
        return json.dumps({"type": "Polygon", "coordinates": _rings(geometry)}).encode()
    return json.dumps({"type": "MultiPolygon", "coordinates": [_rings(p) for p in geometry.geoms]}).encode()
