"""Connected class regions of a label map, vectorised band by band in memory bounded by one band.

The map is read in horizontal bands of one chunk row. Each chunk of a band is vectorised on its
own (``rasterio.features.shapes``, 4-connected, pixel-edge polygons in integer pixel
coordinates). A region can continue across the seams between chunks and between bands; pieces
that touch the band's lower edge stay *open*, and the next band's pieces that touch its upper
edge are linked to them (as pieces are to their left neighbours within a band) where the same
class lies on both sides of the seam over a pixel or more. A region whose
pieces no longer reach the band's lower edge is *closed*: its pieces are dissolved into one
polygon (a union of a handful of pieces that share only straight seam edges) and it is
yielded straight away. Memory is therefore a few bands plus the regions that cross them; time
is linear in the map's area (no global union of a class). Bands are vectorised a few ahead of
the linking, in worker processes for large maps (see :class:`BandVectoriser`); their pieces
are linked in band and chunk order, so the output is the same as one process's.

Several layers of the same grid (the class map, the Uncertain mask, the artifact map) are
vectorised in the same pass: one band loop, one job per (band, layer). The jobs also count each
band's non-background pixels, so the tissue area needs no pass of its own.

A map that is still being written can be vectorised as it grows: inside :func:`following`, a
band's jobs are submitted only once its rows are final (``segment`` vectorises the bands of its
GeoJSON while the blocks below them still infer: :mod:`wsi_espnet.geojson_follow`).

Specks (regions under ``min_pixels``) that lie wholly inside one chunk are removed from the
chunk's raster before it is vectorised (``skimage.measure.label``, 4-connected like the
polygoniser) and only counted: they would be dropped from the export anyway, and on a real
map they are most of the regions (216,000 of 218,000 on the 40x benchmark slide), so linking
and dissolving no longer spend time on them. A speck that touches a seam is kept until its
region closes, since only then is its whole area known.

Simplification happens inside each chunk, before any merging, as a *coverage*: all polygons
of the chunk, background included, go through ``shapely.coverage_simplify`` together, with the
chunk's outline held fixed (``simplify_boundary=False``). Every boundary between two regions
is simplified once, in one place, so neighbouring classes keep one shared boundary (no gaps,
no overlaps), and the seams stay exact pixel edges with their vertices in place, so pieces on
either side of a seam still match vertex for vertex when they are dissolved. Edges are
segmentised to one vertex per pixel corner first: coverage simplification needs shared edges
to carry identical vertices. The price is that a boundary crossing a seam keeps a vertex on
the seam, which is a pixel corner of the true boundary: harmless, and one vertex per seam.
"""

from __future__ import annotations

import bisect
import contextlib
import contextvars
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rasterio.features
import shapely
import skimage.measure
from affine import Affine
from shapely.geometry import Polygon

BACKGROUND = 0
WORKERS = 2  # band jobs at once
LOOKAHEAD = 4  # bands read and vectorised ahead of the linking (bounds the pieces held)
# Maps of at least this many pixels (about 64 chunks of 512²) vectorise in processes: the
# workers' start-up (about a second: they import rasterio, shapely, skimage and zarr) pays off.
PROCESS_MIN_PX = 16 * 1024 * 1024
_PROCESSES_ALLOWED = False  # see allow_processes()

LabelLayer = Any  # a zarr.Array or anything with ``shape``, ``chunks``, ``shards`` and 2-D slicing
Intervals = list[tuple[float, float]]
#: ``wait(rows)`` blocks until rows ``0:rows`` of the layers are final (see :func:`following`)
RowsReady = Callable[[int], None]
_ROWS_READY: contextvars.ContextVar[RowsReady | None] = contextvars.ContextVar("rows_ready", default=None)


@contextlib.contextmanager
def following(wait: RowsReady) -> Iterator[None]:
    """Vectorise layers that are still being written: each band waits for ``wait(band's end row)``.

    The waiting is ambient (a context variable) rather than a parameter because it belongs to
    the caller's run, not to the export: ``write_geojson`` and ``export_all`` stay unchanged.
    """
    token = _ROWS_READY.set(wait)
    try:
        yield
    finally:
        _ROWS_READY.reset(token)


@dataclass(frozen=True)
class _Piece:
    """One polygon of one chunk and what linking needs of it, found in the band job.

    The seam intervals (where the exact polygon lies on its band's upper or lower edge, or on
    its chunk's left or right edge) and the exact area travel instead of the exact polygon, so
    the linking, which runs in one process in band order, only matches intervals.
    """

    value: int
    shape: Polygon  # simplified (exact at tolerance 0)
    pixels: float  # exact area
    left: float  # exact bounds in x
    right: float
    top_seam: Intervals  # x intervals on the band's upper edge
    bottom_seam: Intervals  # x intervals on the band's lower edge
    left_seam: Intervals  # y intervals on a chunk seam at ``left`` (not the map's edge)
    right_seam: Intervals  # y intervals on a chunk seam at ``right``


@dataclass
class Region:
    """One 4-connected region of one class: its simplified pieces and its exact pixel area."""

    value: int
    pieces: list[shapely.Geometry] = field(default_factory=list)
    pixels: float = 0.0
    bottom: list[tuple[float, float]] = field(default_factory=list)  # x intervals on the lower seam

    def geometry(self) -> shapely.Geometry:
        """The region as one geometry: pieces dissolved across the seams, collinear vertices removed.

        Simplified pieces are a coverage (they meet only along seams, vertex for vertex, since
        they were segmentised), so GEOS's coverage union dissolves them without the overlay of
        a general union (4x faster here). Exact pieces (tolerance 0) are not noded alike along
        the seams; coverage union refuses them and the general union does it.
        """
        if len(self.pieces) == 1:
            merged = self.pieces[0]
        else:
            try:
                merged = shapely.coverage_union_all(self.pieces)
            except shapely.errors.GEOSException:
                merged = shapely.union_all(self.pieces)
        return shapely.simplify(merged, 0.0)  # drops the one-per-pixel vertices of straight runs


class BandVectoriser:
    """Every region of every non-background value of each layer, in the order they close.

    ``layers`` are arrays of one shape and chunking (sliced ``layer[y0:y1, :]``); iterating
    yields ``(layer index, region)``. ``tolerance`` is the coverage-simplification tolerance in
    pixels of the layers (0: exact pixel edges); ``min_pixels`` the speck threshold, whose
    in-chunk specks end up in :attr:`specks` instead of being yielded. Each stored chunk is
    vectorised and simplified on its own (GEOS coverage simplification is super-linear in the
    size of one coverage), so a band's cost is linear in its width; its pieces are linked
    across the chunk seams like the band seams.

    One job reads, prunes and vectorises one band of one layer; jobs run ``LOOKAHEAD`` bands
    ahead of the linking, which stays in band order in this process. With ``processes`` the
    jobs run in ``WORKERS`` spawned processes (the polygoniser's Python side and the building of
    polygons hold the GIL, so threads overlap only the GEOS parts), else in as many threads.
    """

    def __init__(
        self, layers: Sequence[LabelLayer], tolerance: float, min_pixels: float = 0.0, processes: bool = False
    ) -> None:
        self.layers, self.tolerance, self.min_pixels = list(layers), tolerance, min_pixels
        self.processes = processes
        #: ``(layer index, value) -> [count, pixels]`` of the specks removed inside chunks
        self.specks: dict[tuple[int, int], list[int]] = {}
        #: non-background pixels of each layer (specks included), complete once iterated
        self.nonzero = [0 for _ in self.layers]

    def __iter__(self) -> Iterator[tuple[int, Region]]:
        if not self.layers:
            return
        height = self.layers[0].shape[0]
        chunk_h, chunk_w = self.layers[0].shards or self.layers[0].chunks
        bands = [(y0, min(y0 + chunk_h, height)) for y0 in range(0, height, chunk_h)]
        open_regions: list[list[Region]] = [[] for _ in self.layers]
        wait = _ROWS_READY.get()
        with _executor(self.processes) as pool:
            pending: deque[list[Future]] = deque()
            for y0, y1 in bands[:LOOKAHEAD]:
                pending.append(self._submit(pool, (y0, y1), chunk_w, wait))
            for number, (_, y1) in enumerate(bands):
                futures = pending.popleft()
                for index, future in enumerate(futures):
                    pieces, specks, nonzero = future.result()
                    self.nonzero[index] += nonzero
                    for value, (count, pixels) in specks.items():
                        _tally(self.specks, (index, value), count, pixels)
                    closed, open_regions[index] = _link(open_regions[index], pieces, y1 < height)
                    yield from ((index, region) for region in closed)
                if number + LOOKAHEAD < len(bands):  # after this band's regions, so none waits on it
                    pending.append(self._submit(pool, bands[number + LOOKAHEAD], chunk_w, wait))
            for index, regions in enumerate(open_regions):
                yield from ((index, region) for region in regions)

    def _submit(
        self, pool: Executor, rows: tuple[int, int], chunk_w: int, wait: RowsReady | None
    ) -> list[Future]:
        """One job per layer for the band of ``rows`` (y0, y1), once they are final."""
        if wait is not None:
            wait(rows[1])
        job = _BandJob(*rows, chunk_w, self.tolerance, self.min_pixels)
        return [pool.submit(job.run, layer) for layer in self.layers]


@dataclass(frozen=True)
class _BandJob:
    """Read one band of a layer, prune its in-chunk specks and vectorise its non-empty chunks
    (picklable: it runs in a worker process for large maps)."""

    y0: int
    y1: int
    chunk_w: int
    tolerance: float
    min_pixels: float

    def run(self, layer: LabelLayer) -> tuple[list[_Piece], dict[int, list[int]], int]:
        """The band's pieces, its in-chunk specks (value -> [count, pixels]) and its
        non-background pixel count."""
        band = np.asarray(layer[self.y0 : self.y1, :])
        pieces: list[_Piece] = []
        specks: dict[int, list[int]] = {}
        for x0 in range(0, band.shape[1], self.chunk_w):
            block = band[:, x0 : x0 + self.chunk_w]
            if not (block != BACKGROUND).any():
                continue
            block, found = _prune_specks(block, self.min_pixels)
            for value, (count, pixels) in found.items():
                _tally(specks, value, count, pixels)
            pieces += _block_pieces(block, (x0, self.y0), self)
        return pieces, specks, int(np.count_nonzero(band != BACKGROUND))

    def piece(self, value: int, exact: Polygon, shape: Polygon, area: float, bounds: list[float]) -> _Piece:
        """The :class:`_Piece` of ``exact`` (of ``bounds``) in this band, with its seam intervals."""
        left, top, right, bottom = bounds

        def on(line: bool, axis: int, at: float) -> Intervals:
            return _seam_intervals(exact, axis, at) if line else []

        return _Piece(
            value,
            shape,
            area,
            left,
            right,
            on(top == self.y0, 1, self.y0),
            on(bottom >= self.y1, 1, self.y1),
            on(left % self.chunk_w == 0 and left > 0, 0, left),
            on(right % self.chunk_w == 0, 0, right),
        )


def _tally(specks: dict[Any, list[int]], key: Any, count: int, pixels: int) -> None:
    """Add ``count`` specks of ``pixels`` in all to ``specks[key]`` (``[count, pixels]``)."""
    entry = specks.setdefault(key, [0, 0])
    entry[0] += count
    entry[1] += pixels


def _executor(processes: bool) -> Executor:
    """``WORKERS`` spawned processes, or as many threads."""
    if processes:
        return ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn"))
    return ThreadPoolExecutor(WORKERS, thread_name_prefix="vectorise")


def use_processes(map_px: int) -> bool:
    """Whether to vectorise a map of ``map_px`` pixels in worker processes: when it is large
    (their start-up, about a second, pays off from ``PROCESS_MIN_PX``) and this process has
    said it may start them (:func:`allow_processes`). Spawned workers re-import the
    ``__main__`` module, which only a program written for it (``export.isolated``) can take."""
    return _PROCESSES_ALLOWED and map_px >= PROCESS_MIN_PX and not multiprocessing.current_process().daemon


def allow_processes() -> None:
    """Let this process's GeoJSON exports vectorise large maps in worker processes."""
    global _PROCESSES_ALLOWED
    _PROCESSES_ALLOWED = True


def _prune_specks(block: np.ndarray, min_pixels: float) -> tuple[np.ndarray, dict[int, tuple[int, int]]]:
    """``block`` with its specks set to background, and ``value -> (count, pixels)`` of them.

    A speck is a 4-connected region of one value, under ``min_pixels``, that does not touch the
    block's edge (so it lies wholly in this chunk and its area is final).
    """
    if min_pixels <= 1:
        return block, {}
    regions = skimage.measure.label(block, background=BACKGROUND, connectivity=1)
    sizes = np.bincount(regions.ravel())
    small = sizes < min_pixels
    small[0] = False
    small[np.unique(np.concatenate((regions[0], regions[-1], regions[:, 0], regions[:, -1])))] = False
    if not small.any():
        return block, {}
    value_of = np.zeros(sizes.size, dtype=block.dtype)
    value_of[regions.ravel()] = block.ravel()
    ids = np.flatnonzero(small)
    counts = np.bincount(value_of[ids], minlength=256)
    pixels = np.bincount(value_of[ids], weights=sizes[ids], minlength=256)
    pruned = np.where(small[regions], BACKGROUND, block).astype(block.dtype)
    return pruned, {int(v): (int(counts[v]), int(pixels[v])) for v in np.flatnonzero(counts)}


def _block_pieces(block: np.ndarray, origin: tuple[int, int], band: _BandJob) -> list[_Piece]:
    """Each non-background polygon of one chunk at ``origin`` of ``band``, as a :class:`_Piece`."""
    transform = Affine.translation(*origin)
    tolerance = band.tolerance
    mask = None if tolerance > 0 else block != BACKGROUND  # background is only needed to simplify
    shapes = list(rasterio.features.shapes(block, mask=mask, transform=transform))
    values = np.array([int(value) for _, value in shapes])
    exact = np.array([_polygon(geometry["coordinates"]) for geometry, _ in shapes], dtype=object)
    simplified = exact
    if tolerance > 0:
        coverage = shapely.segmentize(exact, 1.0)
        simplified = shapely.coverage_simplify(coverage, tolerance, simplify_boundary=False)
    keep = values != BACKGROUND
    areas = shapely.area(exact[keep]).tolist()
    bounds = shapely.bounds(exact[keep]).tolist()
    return [
        band.piece(value, polygon, shape, area, box)
        for value, polygon, shape, area, box in zip(
            values[keep].tolist(), exact[keep], simplified[keep], areas, bounds, strict=True
        )
    ]


def _polygon(rings: list) -> Polygon:
    """A polygon from GeoJSON-style rings; through numpy, ~4x faster than ``shapely.geometry.shape``."""
    shell, *holes = (shapely.linearrings(np.asarray(ring, dtype=float)) for ring in rings)
    return shapely.polygons(shell, holes=holes or None)


def _seam_intervals(polygon: Polygon, axis: int, at: float) -> list[tuple[float, float]]:
    """Intervals (positive length) along which ``polygon``'s boundary lies on a seam line.

    ``axis`` 1: the horizontal line y = ``at``, intervals in x; ``axis`` 0: the vertical line
    x = ``at``, intervals in y.
    """
    along = 1 - axis
    # Every ring's points in one call, with the ring each belongs to: a polygon of many holes
    # costs one pass, not one call per ring (the loop over rings was a fifth of the export).
    points, ring = shapely.get_coordinates(shapely.get_rings(polygon), return_index=True)
    a, b = points[:-1], points[1:]
    on_line = (ring[:-1] == ring[1:]) & (a[:, axis] == at) & (b[:, axis] == at) & (a[:, along] != b[:, along])
    lo = np.minimum(a[on_line, along], b[on_line, along])
    hi = np.maximum(a[on_line, along], b[on_line, along])
    return list(zip(lo.tolist(), hi.tolist(), strict=True))


class _Seams:
    """Interval ends on seam lines, keyed by (seam, class), found again by bisection."""

    def __init__(self) -> None:
        self.ends: dict[tuple[float, int], list[tuple[float, float, int]]] = {}

    def add(self, key: tuple[float, int], intervals: list[tuple[float, float]], node: int) -> None:
        self.ends.setdefault(key, []).extend((lo, hi, node) for lo, hi in intervals)

    def sort(self) -> None:
        for intervals in self.ends.values():
            intervals.sort()

    def overlapping(self, key: tuple[float, int], lo: float, hi: float) -> Iterator[int]:
        """Nodes whose interval overlaps (lo, hi) by a positive length; intervals of one key are disjoint."""
        candidates = self.ends.get(key, [])
        i = bisect.bisect_left(candidates, (hi, -np.inf, -1)) - 1
        while i >= 0 and candidates[i][1] > lo:
            yield candidates[i][2]
            i -= 1


def _link(
    open_regions: list[Region], pieces: list[_Piece], lower_seam: bool
) -> tuple[list[Region], list[Region]]:
    """Join a band's pieces to each other and to the open regions above; return (closed, still open).

    ``lower_seam`` is False for the last band (nothing below it stays open). Linking is a
    union-find over the open regions and the new pieces: a piece's upper edge is matched with
    the open regions' lower seam intervals, its left edge with the right edges of the pieces of
    the chunk to its left.
    """
    first = len(open_regions)
    parent = list(range(first + len(pieces)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    seams = _Seams()
    for node, region in enumerate(open_regions):
        seams.add((-1.0, region.value), region.bottom, node)
    for offset, piece in enumerate(pieces):
        if piece.right_seam:
            seams.add((piece.right, piece.value), piece.right_seam, first + offset)
    seams.sort()
    for offset, piece in enumerate(pieces):
        queries = [((-1.0, piece.value), lo, hi) for lo, hi in piece.top_seam]
        queries += [((piece.left, piece.value), lo, hi) for lo, hi in piece.left_seam]
        for key, lo, hi in queries:
            for node in seams.overlapping(key, lo, hi):
                parent[find(first + offset)] = find(node)
    groups: dict[int, Region] = {}
    for node, region in enumerate(open_regions):
        target = groups.setdefault(find(node), Region(region.value))
        target.pieces.extend(region.pieces)
        target.pixels += region.pixels
    for offset, piece in enumerate(pieces):
        target = groups.setdefault(find(first + offset), Region(piece.value))
        target.pieces.append(piece.shape)
        target.pixels += piece.pixels
        if lower_seam:
            target.bottom.extend(piece.bottom_seam)
    closed = [region for region in groups.values() if not region.bottom]
    still_open = [region for region in groups.values() if region.bottom]
    return closed, still_open
