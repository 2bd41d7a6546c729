"""Connected class regions of a label map, vectorised band by band in memory bounded by one band.

The map is read in horizontal bands of one chunk row. Each band is vectorised on its own
(``rasterio.features.shapes``, 4-connected, pixel-edge polygons in integer pixel coordinates).
A region can continue across the seam between two bands; pieces that touch the band's lower
edge stay *open*, and the next band's pieces that touch its upper edge are linked to them
where the same class lies on both sides of the seam over a pixel or more. A region whose
pieces no longer reach the band's lower edge is *closed*: its pieces are dissolved into one
polygon (a union of a handful of pieces that share only straight seam edges) and it is
yielded straight away. Memory is therefore one band plus the regions that cross it; time is
linear in the map's area (no global union of a class).

Simplification happens inside each band, before any merging, as a *coverage*: all polygons
of the band, background included, go through ``shapely.coverage_simplify`` together, with the
band's outline held fixed (``simplify_boundary=False``). Every boundary between two regions
is simplified once, in one place, so neighbouring classes keep one shared boundary (no gaps,
no overlaps), and the seams stay exact pixel edges with their vertices in place, so pieces on
either side of a seam still match vertex for vertex when they are dissolved. Edges are
segmentised to one vertex per pixel corner first: coverage simplification needs shared edges
to carry identical vertices. The price is that a boundary crossing a seam keeps a vertex on
the seam, which is a pixel corner of the true boundary: harmless, and one vertex per seam.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import rasterio.features
import shapely
import zarr
from affine import Affine
from shapely.geometry import Polygon

BACKGROUND = 0


@dataclass
class Region:
    """One 4-connected region of one class: its simplified pieces and its exact pixel area."""

    value: int
    pieces: list[shapely.Geometry] = field(default_factory=list)
    pixels: float = 0.0
    bottom: list[tuple[float, float]] = field(default_factory=list)  # x intervals on the lower seam

    def geometry(self) -> shapely.Geometry:
        """The region as one geometry: pieces dissolved across the seams, collinear vertices removed."""
        merged = self.pieces[0] if len(self.pieces) == 1 else shapely.union_all(self.pieces)
        return shapely.simplify(merged, 0.0)  # drops the one-per-pixel vertices of straight runs


def iter_regions(labels: zarr.Array, tolerance: float) -> Iterator[Region]:
    """Every region of every non-background class, in the order they close (top to bottom).

    ``tolerance`` is the coverage-simplification tolerance in pixels of ``labels`` (0: exact
    pixel edges).
    """
    height = labels.shape[0]
    band_rows = (labels.shards or labels.chunks)[0]
    open_regions: list[Region] = []
    for y0 in range(0, height, band_rows):
        y1 = min(y0 + band_rows, height)
        band = np.asarray(labels[y0:y1, :])
        pieces = _band_pieces(band, y0, tolerance) if (band != BACKGROUND).any() else []
        closed, open_regions = _link(open_regions, pieces, y0, y1 if y1 < height else None)
        yield from closed
    yield from open_regions


def _band_pieces(band: np.ndarray, y0: int, tolerance: float) -> list[tuple[int, Polygon, Polygon]]:
    """``(value, exact piece, simplified piece)`` for each non-background polygon of one band."""
    transform = Affine.translation(0, y0)
    mask = None if tolerance > 0 else band != BACKGROUND  # background is only needed to simplify
    shapes = list(rasterio.features.shapes(band, mask=mask, transform=transform))
    values = np.array([int(value) for _, value in shapes])
    exact = np.array([shapely.geometry.shape(geometry) for geometry, _ in shapes], dtype=object)
    simplified = exact
    if tolerance > 0:
        coverage = shapely.segmentize(exact, 1.0)
        simplified = shapely.coverage_simplify(coverage, tolerance, simplify_boundary=False)
    keep = values != BACKGROUND
    return list(zip(values[keep].tolist(), exact[keep], simplified[keep], strict=True))


def _seam_intervals(polygon: Polygon, y: float) -> list[tuple[float, float]]:
    """The x intervals (positive length) along which ``polygon``'s boundary lies on the line ``y``."""
    ring_points = [shapely.get_coordinates(ring) for ring in (polygon.exterior, *polygon.interiors)]
    intervals = []
    for points in ring_points:
        a, b = points[:-1], points[1:]
        on_line = (a[:, 1] == y) & (b[:, 1] == y) & (a[:, 0] != b[:, 0])
        for (xa, _), (xb, _) in zip(a[on_line], b[on_line], strict=True):
            intervals.append((min(xa, xb), max(xa, xb)))
    return intervals


def _link(
    open_regions: list[Region],
    pieces: list[tuple[int, Polygon, Polygon]],
    y0: int,
    y1: int | None,
) -> tuple[list[Region], list[Region]]:
    """Join this band's pieces to the open regions above; return (closed regions, still open).

    ``y1`` is the band's lower seam, None for the last band. Linking is a union-find over
    open regions and new pieces, with the open regions' seam intervals sorted per class so
    each lookup is a bisection.
    """
    parent = list(range(len(open_regions) + len(pieces)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    starts: dict[int, list[tuple[float, float, int]]] = {}
    for index, region in enumerate(open_regions):
        for x0, x1 in region.bottom:
            starts.setdefault(region.value, []).append((x0, x1, index))
    for intervals in starts.values():
        intervals.sort()
    for offset, (value, exact, _) in enumerate(pieces):
        candidates = starts.get(value)
        if not candidates or exact.bounds[1] > y0:
            continue
        for x0, x1 in _seam_intervals(exact, y0):
            # intervals of one class on one seam are disjoint; scan back from the last start < x1
            i = bisect.bisect_left(candidates, (x1, -np.inf, -1)) - 1
            while i >= 0 and candidates[i][1] > x0:
                parent[find(len(open_regions) + offset)] = find(candidates[i][2])
                i -= 1
    groups: dict[int, Region] = {}
    for index, region in enumerate(open_regions):
        target = groups.setdefault(find(index), Region(region.value))
        target.pieces.extend(region.pieces)
        target.pixels += region.pixels
    for offset, (value, exact, simplified) in enumerate(pieces):
        target = groups.setdefault(find(len(open_regions) + offset), Region(value))
        target.pieces.append(simplified)
        target.pixels += exact.area
        if y1 is not None and exact.bounds[3] >= y1:
            target.bottom.extend(_seam_intervals(exact, y1))
    closed = [region for region in groups.values() if not region.bottom]
    still_open = [region for region in groups.values() if region.bottom]
    return closed, still_open
