"""Region of interest from the user's QuPath annotations: read, check, normalise, rasterise.

``segment --roi FILE.geojson`` takes what QuPath writes with *File › Export objects as GeoJSON*: a
FeatureCollection, a JSON list of Features (the export without *Export as FeatureCollection*), one
Feature, or a bare geometry, also inside a ZIP (*Compress data (zip)*). Coordinates are QuPath's
level-0 frame, which for slides with ``openslide.bounds-x/y`` is OpenSlide's level-0 frame minus
that offset (see
:mod:`wsi_espnet.export.geojson`); the ROI is moved back by adding the offset, then divided by the
analysis scale, so it lands on the label map's pixels.

What is kept: Polygon and MultiPolygon geometries (parts of a GeometryCollection too) of objects
that are not detections, cells or tiles (an "export all objects" file carries thousands of cell
outlines that are not regions anyone drew). Points and lines are ignored. ``--roi-class`` keeps
only annotations whose QuPath class is one of the names given (exact, case-sensitive, as QuPath
compares classes; a derived class reads ``Tumor: Positive``).

Self-intersecting or otherwise invalid polygons are **repaired** with ``shapely.make_valid`` and
the repair is reported (a warning in the client, the names in run.json): QuPath's brush and
polygon tools make bow-ties easily, and refusing them would send the user back to QuPath for a
problem with one obvious fix. Everything else that makes the ROI unusable is a one-line
:class:`RoiError` naming the file, raised in the client's preflight before Dask starts.

The kept annotations are written, as QuPath annotations in QuPath's frame, to
``<stem>.roi.geojson`` in the slide's output folder; its SHA-256 (:attr:`Roi.sha256`) goes into the
store parameters, so a partial run resumes only with the same ROI, and statistics and exports
(also a later ``wsi-espnet export``) read the ROI from there, never from the user's file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import shapely
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon, box, mapping, shape

from wsi_espnet.errors import WsiEspnetError
from wsi_espnet.roi_regions import Annotation, RoiRegions

if TYPE_CHECKING:
    from wsi_espnet.config import SegmentSettings
    from wsi_espnet.grid import TileGrid
    from wsi_espnet.outputs import SlideOutput
    from wsi_espnet.runstate import SlideJob
    from wsi_espnet.store import SlideStore

logger = logging.getLogger(__name__)

NOT_REGIONS = frozenset({"detection", "cell", "tile"})  # QuPath object types that are not drawn regions
META_KEY = "wsi_espnet"
CLASS_COLOR = (255, 200, 0)  # for a classified annotation whose file gave no colour (QuPath needs one)


class RoiError(WsiEspnetError):
    """A ``--roi`` file cannot be used: not JSON, no polygon, no annotation of the classes asked for..."""


@dataclass(frozen=True)
class Roi:
    """The annotations kept from a ROI file, in QuPath's level-0 frame, and which were repaired."""

    source: Path
    annotations: tuple[Annotation, ...]

    @property
    def repaired(self) -> list[str]:
        """``name: reason`` of each annotation that make_valid repaired."""
        return [f"{a.name}: {a.repaired}" for a in self.annotations if a.repaired]

    def collection(self) -> dict[str, Any]:
        """The normalised ROI as a QuPath FeatureCollection (what ``<stem>.roi.geojson`` holds)."""
        features = []
        for annotation in self.annotations:
            properties: dict[str, Any] = {
                "objectType": "annotation",
                "name": annotation.name,
                "isLocked": True,
            }
            if annotation.classification is not None:
                color = list(annotation.color or CLASS_COLOR)
                properties["classification"] = {"name": annotation.classification, "color": color}
            features.append(
                {"type": "Feature", "geometry": mapping(annotation.geometry), "properties": properties}
            )
        return {"type": "FeatureCollection", "features": features}

    @property
    def sha256(self) -> str:
        """Hash of the normalised annotations: equal for the same regions whatever file they came from."""
        text = json.dumps(self.collection(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def record(self) -> dict[str, Any]:
        """What run.json says about the ROI: its source, hashes, classes and repairs."""
        return {
            "source": str(self.source.resolve()),
            "source_sha256": hashlib.sha256(self.source.read_bytes()).hexdigest(),
            "sha256": self.sha256,
            "annotations": len(self.annotations),
            "classes": sorted({a.classification for a in self.annotations if a.classification is not None}),
            "repaired": self.repaired,
        }

    def check_inside(self, dimensions: tuple[int, int], bounds_offset: tuple[int, int]) -> None:
        """Refuse a ROI that misses the slide's level-0 frame entirely (wrong file or wrong frame)."""
        width, height = dimensions
        frame = box(0, 0, width, height)
        moved = affinity.translate(self.union, *bounds_offset)
        if not moved.intersects(frame) or moved.intersection(frame).area == 0:
            x0, y0, x1, y1 = (round(v) for v in self.union.bounds)
            raise RoiError(
                f"the ROI ({x0}, {y0})-({x1}, {y1}) lies entirely outside the slide "
                f"({width} x {height} px at level 0); was it drawn on another image?",
                self.source,
            )

    @property
    def union(self) -> shapely.Geometry:
        """All annotations as one geometry, in QuPath's frame."""
        return shapely.union_all([a.geometry for a in self.annotations])

    def in_analysis(self, bounds_offset: tuple[int, int], scale: float, shape: tuple[int, int]) -> RoiRegions:
        """The ROI in analysis pixels (``scale`` level-0 px per analysis px), clipped to ``shape``."""
        dx, dy = bounds_offset
        transform = [1 / scale, 0, 0, 1 / scale, dx / scale, dy / scale]
        frame = box(0, 0, shape[1], shape[0])
        moved = []
        for annotation in self.annotations:
            geometry = _polygonal(
                affinity.affine_transform(annotation.geometry, transform).intersection(frame)
            )
            moved.append(Annotation(annotation.name, annotation.classification, geometry, annotation.color))
        return RoiRegions(tuple(moved))


def read_roi(path: str | Path, classes: tuple[str, ...] = ()) -> Roi:
    """Read a QuPath GeoJSON export; keep its polygon annotations (of ``classes`` when given)."""
    path = Path(path)
    try:
        data = json.loads(_read_text(path))
    except FileNotFoundError:
        raise RoiError("no such ROI file", path) from None
    except (OSError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        raise RoiError(f"cannot read the ROI file ({exc})", path) from None
    except json.JSONDecodeError as exc:
        raise RoiError(
            f"is not JSON ({exc.msg} at line {exc.lineno}); export the ROI from QuPath as GeoJSON", path
        ) from None
    annotations = []
    for index, feature in enumerate(_features(data, path), start=1):
        annotation = _annotation(feature, index, path)
        if annotation is not None:
            annotations.append(annotation)
    if not annotations:
        raise RoiError("holds no polygon annotation (points, lines and detections are not regions)", path)
    if classes:
        kept = [a for a in annotations if a.classification in classes]
        if not kept:
            found = sorted({a.classification or "unclassified" for a in annotations})
            raise RoiError(
                f"no annotation of class {', '.join(classes)} (--roi-class); "
                f"the file has: {', '.join(found)}",
                path,
            )
        annotations = kept
    return Roi(path, tuple(annotations))


def _read_text(path: Path) -> str:
    """The file's text; a ZIP (QuPath's *Compress data (zip)* export) must hold one GeoJSON file."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        return path.read_text(encoding="utf-8")
    with zipfile.ZipFile(path) as archive:
        members = [n for n in archive.namelist() if n.lower().endswith((".geojson", ".json"))]
        if len(members) != 1:
            raise RoiError(f"is a ZIP archive with {len(members)} GeoJSON files in it; it needs one", path)
        return archive.read(members[0]).decode("utf-8")


def _features(data: Any, path: Path) -> list[dict[str, Any]]:
    """The features of a FeatureCollection, a list of Features, one Feature or a bare geometry."""
    if isinstance(data, list):
        return [f for f in data if isinstance(f, dict)]
    if not isinstance(data, dict):
        raise RoiError("is JSON but not GeoJSON (expected a FeatureCollection, Feature or geometry)", path)
    kind = data.get("type")
    if kind == "FeatureCollection":
        features = data.get("features")
        return [f for f in features if isinstance(f, dict)] if isinstance(features, list) else []
    if kind == "Feature":
        return [data]
    if "coordinates" in data or kind == "GeometryCollection":
        return [{"type": "Feature", "geometry": data, "properties": {}}]
    raise RoiError(
        f"is JSON but not GeoJSON (type {kind!r}; expected a FeatureCollection, Feature or geometry)", path
    )


def _annotation(feature: dict[str, Any], index: int, path: Path) -> Annotation | None:
    """One feature as an annotation (None when it is not a region with an area)."""
    properties = feature.get("properties") or {}
    if not isinstance(properties, dict) or properties.get("objectType") in NOT_REGIONS:
        return None
    raw = feature.get("geometry")
    if not isinstance(raw, dict):
        return None
    try:
        geometry = shape(raw)
    except (ValueError, TypeError, AttributeError, KeyError, shapely.errors.GEOSException) as exc:
        raise RoiError(f"feature {index} has an unreadable geometry ({exc})", path) from None
    reason = _invalid_reason(geometry)
    polygons = _polygonal(shapely.make_valid(geometry) if reason else geometry)
    if polygons.is_empty:
        return None
    name, color = _classification(properties.get("classification"))
    label = str(properties.get("name") or f"annotation {index}")
    return Annotation(label, name, polygons, color, reason)


def _invalid_reason(geometry: shapely.Geometry) -> str | None:
    """GEOS's reason why a polygon part is invalid (a self-intersection, say), None when all are valid."""
    for part in shapely.get_parts(geometry):
        if part.geom_type in ("Polygon", "MultiPolygon") and not part.is_valid:
            return str(shapely.is_valid_reason(part))
    return None


def _classification(value: Any) -> tuple[str | None, tuple[int, int, int] | None]:
    """QuPath's class name and colour: ``{"name"}`` (0.4+), ``{"names"}`` (0.6+ derived classes),
    the legacy nested ``parentClass`` with a packed ``colorRGB``, or a plain string."""
    if isinstance(value, str):
        return value, None
    if not isinstance(value, dict):
        return None, None
    if isinstance(value.get("names"), list):
        name = ": ".join(str(n) for n in value["names"])
    else:
        names, node = [], value
        while isinstance(node, dict) and node.get("name"):
            names.append(str(node["name"]))
            node = node.get("parentClass")
        name = ": ".join(reversed(names)) if names else None
    color = value.get("color")
    if isinstance(color, list) and len(color) == 3:
        return name, (int(color[0]), int(color[1]), int(color[2]))
    if isinstance(value.get("colorRGB"), int):
        packed = value["colorRGB"] & 0xFFFFFF
        return name, ((packed >> 16) & 255, (packed >> 8) & 255, packed & 255)
    return name, None


def _polygonal(geometry: shapely.Geometry) -> MultiPolygon:
    """The polygons of ``geometry`` (lines and points dropped) as one MultiPolygon."""
    polygons: list[Polygon] = []
    for part in shapely.get_parts(geometry):
        if isinstance(part, Polygon):
            if part.area > 0:
                polygons.append(part)
        elif part.geom_type in ("MultiPolygon", "GeometryCollection"):
            polygons.extend(_polygonal(part).geoms)
    return MultiPolygon(polygons)


def roi_file_for(job: SlideJob, settings: SegmentSettings) -> Path | None:
    """The ROI file of one slide: its manifest row's ``roi`` wins over ``--roi``."""
    return job.roi if job.roi is not None else settings.roi


def read_job_roi(
    job: SlideJob, settings: SegmentSettings, slide_metadata: dict[str, Any], grid: TileGrid, mpp: float
) -> tuple[Roi | None, RoiRegions | None]:
    """In prepare: the slide's ROI (None without one) and the same in the analysis pixels of ``grid``.

    ``slide_metadata`` is :meth:`Slide.metadata` (level-0 mpp and bounds offset), ``mpp`` the
    analysis resolution.
    """
    path = roi_file_for(job, settings)
    if path is None:
        return None, None
    roi = read_roi(path, settings.roi_classes)
    offset = slide_metadata.get("bounds_offset") or (0, 0)
    scale = mpp / float(slide_metadata["mpp"])
    return roi, roi.in_analysis((int(offset[0]), int(offset[1])), scale, grid.shape)


def check_roi(
    job: SlideJob,
    settings: SegmentSettings,
    frame: tuple[tuple[int, int], tuple[int, int]],
    output: SlideOutput,
) -> Roi | None:
    """Preflight of one slide's ROI: it reads, has polygons (of ``--roi-class``), meets the slide
    (``frame``: level-0 dimensions and bounds offset), and is the ROI of a complete output.

    A complete output made with another ROI (or none) is refused rather than redone: only
    ``--overwrite`` may replace finished results. A partial one starts afresh in prepare.
    """
    path = roi_file_for(job, settings)
    roi = None
    if path is None:
        if settings.roi_classes:
            raise RoiError("--roi-class needs --roi (or a manifest 'roi' column)", job.path)
        beside = job.path.parent / f"{job.path.stem}.geojson"
        if beside.is_file():
            logger.info(
                "%s is not used as a region of interest; pass --roi to segment only inside it", beside
            )
    else:
        roi = read_roi(path, settings.roi_classes)
        roi.check_inside(*frame)
        for repaired in roi.repaired:
            logger.warning("%s: annotation %s; repaired with shapely.make_valid", path, repaired)
    run = output.read_run()
    if run and run.get("status") == "complete" and not settings.overwrite:
        recorded = (run.get("roi") or {}).get("sha256")
        if recorded != (roi.sha256 if roi else None):
            raise RoiError(
                f"the complete results in {output.root} were made with "
                f"{'another ROI' if recorded else 'no ROI'}; "
                "use --overwrite to redo them or another --output",
                path or job.path,
            )
    return roi


def write_normalised(roi: Roi, path: Path) -> None:
    """``<stem>.roi.geojson``: the kept annotations in QuPath's frame, plus where they came from."""
    from wsi_espnet.outputs import write_json_atomic

    write_json_atomic(path, {**roi.collection(), META_KEY: roi.record()})


def read_output_roi(store: SlideStore) -> RoiRegions | None:
    """The ROI a result folder was made with (its ``<stem>.roi.geojson``), in analysis pixels."""
    path = store.output.roi_geojson
    if not path.is_file():
        return None
    return read_roi(path).in_analysis(store.bounds_offset, store.scale, store.shape)
