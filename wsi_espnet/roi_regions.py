"""The ROI in analysis pixels: which chunks meet it, which pixels are inside, its outline per level.

What the infer, statistics and export tasks use (it travels in the slide's plan); reading and
checking the user's file is :mod:`wsi_espnet.roi`. Pixel (row, col) covers [col, col + 1] x
[row, row + 1] and is inside when its centre is (``rasterio.features.rasterize``'s rule), so the
masks of adjacent chunks and blocks tile without seams or overlaps.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import shapely
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning
from rasterio.features import rasterize
from shapely import affinity
from shapely.geometry import MultiPolygon, box

from wsi_espnet.blocks import Block
from wsi_espnet.grid import Chunk, TileGrid

# Pixel windows are not map coordinates: the window at (0, 0) has the identity transform, which
# rasterio reports as "not georeferenced". A filter, not catch_warnings: chunks burn in threads.
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module="rasterio.features")


@dataclass(frozen=True)
class Annotation:
    """One annotation of the ROI: its name, QuPath class (None when unclassified) and polygons."""

    name: str
    classification: str | None
    geometry: MultiPolygon
    color: tuple[int, int, int] | None = None
    repaired: str | None = None  # why make_valid had to repair it (e.g. "Self-intersection[...]")


@dataclass(frozen=True)
class RoiRegions:
    """The ROI in analysis pixels: what chunk selection, label masking, statistics and exports use.

    Pixel (row, col) covers [col, col + 1] x [row, row + 1]; it is inside when its centre is (the
    rule of ``rasterio.features.rasterize``), so masks of adjacent chunks tile without seams.
    """

    annotations: tuple[Annotation, ...]

    @cached_property
    def union(self) -> shapely.Geometry:
        """All annotations as one geometry, made once per process (every chunk's mask needs it)."""
        return shapely.union_all([a.geometry for a in self.annotations])

    def select(self, chunks: list[Chunk]) -> list[Chunk]:
        """The ``chunks`` whose core meets the ROI (only they are inferred)."""
        if not chunks:
            return []
        boxes = shapely.box(*np.array([(c.x0, c.y0, c.x0 + c.w, c.y0 + c.h) for c in chunks]).T)
        union = self.union
        shapely.prepare(union)
        return [c for c, hit in zip(chunks, shapely.intersects(union, boxes), strict=True) if hit]

    def chunks(self, grid: TileGrid) -> list[Chunk]:
        """Every chunk of ``grid`` that meets the ROI (the ROI's area is counted over them)."""
        x0, y0, x1, y1 = self.union.bounds
        rows, cols = grid.grid_shape
        r0, c0 = max(0, int(y0 // grid.tile)), max(0, int(x0 // grid.tile))
        r1, c1 = min(rows, int(y1 // grid.tile) + 1), min(cols, int(x1 // grid.tile) + 1)
        return self.select([grid.chunk((r, c)) for r in range(r0, r1) for c in range(c0, c1)])

    def mask(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Boolean (h, w): the analysis pixels of the window at (y0, x0) that lie inside the ROI."""
        return _burn([self.union], y0, x0, h, w)

    def masks(self, y0: int, x0: int, h: int, w: int) -> dict[int, np.ndarray]:
        """Per annotation index, its pixels in the window; annotations that miss it are left out."""
        window = box(x0, y0, x0 + w, y0 + h)
        out = {}
        for index, annotation in enumerate(self.annotations):
            if annotation.geometry.intersects(window):
                inside = _burn([annotation.geometry], y0, x0, h, w)
                if inside.any():
                    out[index] = inside
        return out

    def at_level(self, level: int) -> shapely.Geometry:
        """The ROI's union in pixels of pyramid ``level`` (each level halves the resolution)."""
        return affinity.scale(self.union, 0.5**level, 0.5**level, origin=(0, 0))


def _burn(geometries: list[shapely.Geometry], y0: int, x0: int, h: int, w: int) -> np.ndarray:
    if h <= 0 or w <= 0:
        return np.zeros((max(h, 0), max(w, 0)), bool)
    # Clipped to the window first: burning costs what the window holds, not the whole outline.
    clipped = [shapely.clip_by_rect(g, x0 - 1, y0 - 1, x0 + w + 1, y0 + h + 1) for g in geometries]
    shapes = [g for g in clipped if not g.is_empty]
    if not shapes:
        return np.zeros((h, w), bool)
    burnt = rasterize(shapes, out_shape=(h, w), transform=Affine.translation(x0, y0), fill=0, dtype="uint8")
    return burnt.astype(bool)


def block_core(block: Block, grid: TileGrid) -> tuple[int, int, int, int]:
    """(y0, x0, h, w) of an inference block's core (its chunks, without the halo) in analysis px."""
    return block.row0 * grid.tile, block.col0 * grid.tile, block.rows * grid.tile, block.cols * grid.tile
