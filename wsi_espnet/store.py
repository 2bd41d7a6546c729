"""The stitched result of one slide: an OME-Zarr store written chunk by chunk, read by everything after.

Layout of ``<stem>.ome.zarr`` (all at analysis resolution ``mpp``)::

    /                  image: per-class scores uint8 (c, y, x) = round(softmax * 255), a pyramid
    /labels/tissue     image-label: argmax class uint8 (y, x), the same pyramid, class colours
    /confidence        image: the label's probability uint8 (y, x) = round(p * 255), the same
                       pyramid (2x2 mean of non-zero pixels); 0 = no prediction (``confidence.py``)
    /labels/artifacts  image-label (``--qc flag|exclude`` only): QC's artifact kinds uint8 (y, x),
                       0 none, 1 pen, 2 blur, 3 fold (``qc_kinds.py``), attribute wsi_espnet.qc = mode
    attribute wsi_espnet: model, classes, mpp, tile, halo, slide {path, mpp, dimensions,
                       bounds_offset}, status

* ``zarr_format=2`` (default) writes OME-NGFF 0.4: one file per chunk, chunk = one tile.
* ``zarr_format=3`` writes OME-NGFF 0.5 (metadata under ``"ome"``) with sharding. A shard is the
  unit of storage; writing part of a shard rewrites the whole shard (read-modify-write), so two
  processes writing different inner chunks of one shard would lose one write. The shard edge is
  therefore the tile: the pipeline writes one whole shard per tile, which needs no read and no
  lock, and the inner chunks (tile / 2) only make viewer reads finer.

:class:`SlideStore` is the one reader and writer of this layout: workers write chunks through
it, statistics iterate its :attr:`~SlideStore.grid`, and :func:`open_store` hands one open,
checked store to every exporter. The NGFF metadata comes from ``ngff.py``, the pyramid from
``pyramid.py``, the folder around the store from ``outputs.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_espnet.classes import BACKGROUND, ClassInfo, as_class_infos
from wsi_espnet.confidence import CONFIDENCE_NAME
from wsi_espnet.errors import OutputError
from wsi_espnet.grid import Chunk, TileGrid
from wsi_espnet.ngff import (
    LABEL_NAME,
    confidence_metadata,
    extra_label_metadata,
    ngff_metadata,
    pyramid_shapes,
)
from wsi_espnet.outputs import SlideOutput, find_store
from wsi_espnet.pyramid import Layer, build_levels, mean_2x2, mean_nonzero_2x2, mode_2x2, write_unit
from wsi_espnet.qc_kinds import ARTIFACTS_NAME, KINDS

ATTRS_KEY = "wsi_espnet"
STATUSES = ("running", "complete")
STORE_ATTRS = frozenset({"model", "slide", "qc"})


class SlideStore:
    """One slide's OME-Zarr store; picklable (by path) so Dask workers can write their chunks."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = path
        self._group = group
        self._arrays: dict[str, zarr.Array] = {}

    def __reduce__(self) -> tuple:
        return (SlideStore.open, (str(self.path),))

    @classmethod
    def create(
        cls,
        path: str | Path,
        grid: TileGrid,
        mpp: float,
        classes: Iterable[Any],
        zarr_format: int = 2,
        attrs: Mapping[str, Any] | None = None,
    ) -> SlideStore:
        """Create the empty store for ``grid`` (all levels, full metadata, ``status: running``).

        ``attrs`` fills the rest of the ``wsi_espnet`` block: ``model`` (``{"name", "sha256"}``)
        and ``slide`` (any JSON-able dict, e.g. ``Slide.metadata()``). Unwritten chunks read as 0
        (the background class), so chunks without tissue are never written. ``qc`` (the
        ``--qc`` mode) other than ``"off"`` adds the ``labels/artifacts`` layer and records the
        mode in it.
        """
        path = Path(path)
        if zarr_format not in (2, 3):
            raise OutputError(f"zarr_format must be 2 or 3, not {zarr_format}", path)
        if path.exists():
            raise OutputError("already exists; remove it or overwrite it", path)
        extra = dict(attrs or {})
        if set(extra) - STORE_ATTRS:
            raise ValueError(
                f"unknown store attributes {sorted(set(extra) - STORE_ATTRS)}; use model, slide, qc"
            )
        class_infos = as_class_infos(classes)
        shapes = pyramid_shapes(grid.shape)
        model = extra.get("model") or {}
        block = {
            "model": {"name": str(model.get("name", "")), "sha256": str(model.get("sha256", ""))},
            "classes": [c.as_dict() for c in class_infos],
            "mpp": float(mpp),
            "tile": int(grid.tile),
            "halo": int(grid.halo),
            "slide": dict(extra.get("slide") or {}),
            "status": "running",
        }
        meta = ngff_metadata(class_infos, mpp, len(shapes), zarr_format)
        root = zarr.create_group(
            str(path), zarr_format=zarr_format, overwrite=True, attributes={**meta.image, ATTRS_KEY: block}
        )
        tissue = root.create_group("labels", attributes=meta.labels).create_group(
            LABEL_NAME, attributes=meta.label_image
        )
        confidence = root.create_group(
            CONFIDENCE_NAME, attributes=confidence_metadata(mpp, len(shapes), zarr_format)
        )
        for level, (h, w) in enumerate(shapes):
            _create_array(root, str(level), (len(class_infos), h, w), grid.tile, zarr_format)
            _create_array(tissue, str(level), (h, w), grid.tile, zarr_format)
            _create_array(confidence, str(level), (h, w), grid.tile, zarr_format)
        qc = str(extra.get("qc") or "off")
        if qc != "off":
            _create_artifacts(root, shapes, grid.tile, (mpp, zarr_format), qc)
        return cls(path, root)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r+") -> SlideStore:
        """Open an existing store (``mode="r"`` to only read); not ours → :class:`OutputError`."""
        path = Path(path)
        try:
            group = zarr.open_group(str(path), mode=mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as err:
            raise OutputError("is not a zarr group (not a wsi-espnet store)", path) from err
        if not isinstance(group.attrs.get(ATTRS_KEY), dict):
            raise OutputError(f"has no '{ATTRS_KEY}' attributes (not a wsi-espnet store)", path)
        return cls(path, group)

    # --- metadata -------------------------------------------------------------------------

    @property
    def attrs(self) -> dict:
        """The ``wsi_espnet`` attribute block (model, classes, mpp, tile, halo, slide, status)."""
        return dict(self._group.attrs[ATTRS_KEY])

    @property
    def status(self) -> str:
        return str(self.attrs["status"])

    def set_status(self, status: str) -> None:
        """Mark the store ``running`` or ``complete``; exports refuse incomplete stores."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
        self._group.attrs[ATTRS_KEY] = {**self.attrs, "status": status}

    @property
    def zarr_format(self) -> int:
        return int(self._group.metadata.zarr_format)

    @property
    def mpp(self) -> float:
        """Analysis µm/px of level 0."""
        return float(self.attrs["mpp"])

    @property
    def slide_mpp(self) -> float:
        """Level-0 µm/px of the slide the store was made from."""
        return float(self.attrs["slide"]["mpp"])

    @property
    def scale(self) -> float:
        """Level-0 slide pixels per analysis pixel."""
        return self.mpp / self.slide_mpp

    @property
    def bounds_offset(self) -> tuple[int, int]:
        """``openslide.bounds-x/y`` of the slide (level-0 px), (0, 0) when it has none."""
        x, y = self.attrs.get("slide", {}).get("bounds_offset") or (0, 0)
        return int(x), int(y)

    @property
    def tile(self) -> int:
        return int(self.attrs["tile"])

    @cached_property
    def classes(self) -> tuple[ClassInfo, ...]:
        return as_class_infos(self.attrs["classes"])

    @property
    def tissue_classes(self) -> tuple[ClassInfo, ...]:
        """The classes that can be exported (all but background)."""
        return tuple(c for c in self.classes if c.value != BACKGROUND)

    # --- arrays ---------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 (height, width) at analysis resolution."""
        return tuple(self.labels(0).shape)  # type: ignore[return-value]

    @property
    def grid(self) -> TileGrid:
        """The level-0 chunk grid the store was written in (one chunk = one write unit)."""
        return TileGrid(self.shape, self.tile, int(self.attrs.get("halo", 0)))

    @cached_property
    def n_levels(self) -> int:
        n = 0
        while f"labels/{LABEL_NAME}/{n}" in self._group:
            n += 1
        return n

    def _array(self, key: str) -> zarr.Array | None:
        """The array at ``key`` (None when there is none), opened once per :class:`SlideStore`.

        Opening an array reads its metadata from disk (1-3 ms), and an infer task writes four
        arrays per chunk, its shape and grid asked for each time. A store's arrays are all made
        with it (:meth:`create`) and never reshaped, so an opened one stays valid; an absent one
        is looked up again next time.
        """
        array = self._arrays.get(key)
        if array is None:
            array = self._group.get(key)
            if array is not None:
                self._arrays[key] = array  # type: ignore[assignment]
        return array  # type: ignore[return-value]

    def _required(self, key: str, what: str) -> zarr.Array:
        """:meth:`_array`, or ``KeyError`` naming the store and the missing ``what``."""
        array = self._array(key)
        if array is None:
            raise KeyError(f"{self.path} has no {what}")
        return array

    def labels(self, level: int = 0) -> zarr.Array:
        """The argmax class map (y, x) uint8 of pyramid ``level``."""
        return self._required(f"labels/{LABEL_NAME}/{level}", f"label level {level}")

    def artifacts(self, level: int = 0) -> zarr.Array | None:
        """QC's artifact map (y, x) uint8 of pyramid ``level``; None for a store without QC."""
        return self._array(f"labels/{ARTIFACTS_NAME}/{level}")

    @property
    def qc_mode(self) -> str:
        """``flag`` or ``exclude`` as applied when the artifacts were written; ``off`` without them."""
        if self.artifacts(0) is None:
            return "off"
        return str(self._group[f"labels/{ARTIFACTS_NAME}"].attrs.get(ATTRS_KEY, {}).get("qc", "flag"))

    def scores(self, level: int = 0) -> zarr.Array:
        """The per-class scores (c, y, x) uint8 of pyramid ``level``."""
        return self._required(str(level), f"score level {level}")

    def confidence(self, level: int = 0) -> zarr.Array | None:
        """The label's probability (y, x) uint8 ``round(p * 255)`` of ``level``; None for a store
        written before the confidence layer existed."""
        return self._array(f"{CONFIDENCE_NAME}/{level}")

    def level_mpp(self, level: int) -> float:
        """µm per pixel of pyramid ``level`` (each level halves the resolution)."""
        return self.mpp * 2**level

    def finest_level_within(self, max_side: int) -> int:
        """The finest pyramid level whose larger side is at most ``max_side`` (else the coarsest)."""
        for level in range(self.n_levels):
            if max(self.labels(level).shape) <= max_side:
                return level
        return self.n_levels - 1

    def iter_chunks(self, level: int = 0) -> Iterator[Chunk]:
        """The stored blocks (shards, else chunks) of ``level``: reading one at a time bounds memory."""
        array = self.labels(level)
        unit = write_unit(array)
        if unit[0] != unit[1]:
            raise OutputError(f"level {level} has non-square chunks {unit}", self.path)
        yield from TileGrid(tuple(array.shape), unit[0], 0).chunks  # type: ignore[arg-type]

    def iter_label_chunks(self, level: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(y0, x0, block)`` for every stored block of the label map of ``level``."""
        array = self.labels(level)
        for chunk in self.iter_chunks(level):
            yield chunk.y0, chunk.x0, array[chunk.y0 : chunk.y0 + chunk.h, chunk.x0 : chunk.x0 + chunk.w]

    # --- the folder around the store ------------------------------------------------------

    @property
    def output(self) -> SlideOutput:
        return SlideOutput.of_store(self.path)

    @property
    def store_path(self) -> Path:
        return self.path

    @property
    def stem(self) -> str:
        return self.output.stem

    @property
    def directory(self) -> Path:
        return self.output.root

    @property
    def stats_path(self) -> Path:
        return self.output.stats_json

    def read_run(self) -> dict[str, Any] | None:
        """``run.json`` of the output folder, or None when absent."""
        return self.output.read_run()

    def read_stats(self) -> dict[str, Any] | None:
        """``<stem>.stats.json``, read once per open store (every exporter shares it)."""
        if not hasattr(self, "_stats"):
            self._stats = self.output.read_stats()
        return self._stats

    # --- writing --------------------------------------------------------------------------

    def write_chunk(
        self,
        chunk_index: tuple[int, int],
        scores: np.ndarray,
        labels: np.ndarray,
        *,
        confidence: np.ndarray | None = None,
        artifacts: np.ndarray | None = None,
    ) -> None:
        """Write exactly level-0 chunk ``(iy, ix)``: whole chunks (shards) only, so no locks.

        ``scores`` is (C, h, w) and ``labels``, ``confidence`` and ``artifacts`` (h, w), where
        (h, w) is the chunk clipped to the array (smaller at the bottom and right edges);
        ``artifacts`` (QC's map) needs a store created with QC.
        """
        grid = self.grid
        rows, cols = grid.grid_shape
        if not (0 <= chunk_index[0] < rows and 0 <= chunk_index[1] < cols):
            raise ValueError(f"chunk {chunk_index} is outside the {grid.shape} grid of {grid.tile}")
        c = grid.chunk(chunk_index)
        if labels.shape != (c.h, c.w) or scores.shape != (len(self.classes), c.h, c.w):
            raise ValueError(f"chunk {chunk_index} needs scores (C, {c.h}, {c.w}) and labels ({c.h}, {c.w})")
        self.scores(0)[:, c.y0 : c.y0 + c.h, c.x0 : c.x0 + c.w] = scores.astype(np.uint8, copy=False)
        self.labels(0)[c.y0 : c.y0 + c.h, c.x0 : c.x0 + c.w] = labels.astype(np.uint8, copy=False)
        if confidence is not None:
            target = self.confidence(0)
            if target is None:
                raise OutputError("has no confidence layer (written by an older version)", self.path)
            if confidence.shape != (c.h, c.w):
                raise ValueError(f"chunk {chunk_index} needs confidence ({c.h}, {c.w})")
            target[c.y0 : c.y0 + c.h, c.x0 : c.x0 + c.w] = confidence.astype(np.uint8, copy=False)
        if artifacts is not None:
            layer = self.artifacts(0)
            if layer is None or artifacts.shape != (c.h, c.w):
                raise ValueError(f"chunk {chunk_index}: artifacts need a QC store and shape ({c.h}, {c.w})")
            layer[c.y0 : c.y0 + c.h, c.x0 : c.x0 + c.w] = artifacts.astype(np.uint8, copy=False)

    def build_pyramid(self, written: Iterable[tuple[int, int]] | None = None, client: Any = None) -> None:
        """Fill levels 1..n from level 0 with Dask, one output chunk per task (memory bounded).

        ``written`` lists the level-0 chunks that hold results (all when None): only they and
        their parents are visited.
        """
        build_levels(self.pyramid_layers(), None if written is None else list(written), client)

    def pyramid_layers(self, levels: Sequence[int] | None = None) -> list[Layer]:
        """Every pyramid of the store with its 2x2 reduction (scores, labels, and the confidence
        and QC artifacts where the store has them), over ``levels`` (all when None).

        A pyramid task opens only the two levels it reads and writes: opening every level of
        every layer cost 67 ms on the 40x benchmark store, once per task.
        """
        levels = range(self.n_levels) if levels is None else levels
        layers = [
            Layer([self.scores(n) for n in levels], mean_2x2),
            Layer([self.labels(n) for n in levels], mode_2x2),
        ]
        if self.confidence(0) is not None:
            layers.append(Layer([self.confidence(n) for n in levels], mean_nonzero_2x2))
        if self.artifacts(0) is not None:
            layers.append(Layer([self.artifacts(n) for n in levels], mode_2x2))
        return layers


def open_store(target: str | Path | SlideStore) -> SlideStore:
    """One slide's store, read-only, checked to carry what the exporters rely on.

    ``target`` is ``<dir>/<stem>.ome.zarr``, ``<dir>/<stem>``, a folder holding one store, or an
    already open store (returned as is, so one opened store serves every exporter).
    """
    if isinstance(target, SlideStore):
        return target
    store = SlideStore.open(find_store(target), mode="r")
    try:
        classes, mpp, slide_mpp = store.classes, store.mpp, store.slide_mpp
    except (KeyError, TypeError, ValueError) as error:
        raise OutputError(f"incomplete '{ATTRS_KEY}' metadata ({error!r})", store.path) from error
    del classes  # parsed above so a malformed class table fails here, naming the store
    if not (math.isfinite(mpp) and math.isfinite(slide_mpp) and mpp > 0 and slide_mpp > 0):
        raise OutputError(f"invalid resolution in metadata (mpp={mpp}, slide mpp={slide_mpp})", store.path)
    if store.n_levels == 0:
        raise OutputError(f"no label map at labels/{LABEL_NAME}/0", store.path)
    return store


def _create_artifacts(
    root: zarr.Group, shapes: list[tuple[int, int]], tile: int, frame: tuple[float, int], mode: str
) -> None:
    """The ``labels/artifacts`` image-label of QC, its levels like the tissue labels'."""
    mpp, zarr_format = frame
    meta = extra_label_metadata(ARTIFACTS_NAME, KINDS, mpp, len(shapes), zarr_format)
    labels = root["labels"]
    labels.attrs.update(meta.labels)
    layer = labels.create_group(ARTIFACTS_NAME, attributes={**meta.label_image, ATTRS_KEY: {"qc": mode}})
    for level, (h, w) in enumerate(shapes):
        _create_array(layer, str(level), (h, w), tile, zarr_format)


def _create_array(group: zarr.Group, name: str, shape: tuple[int, ...], tile: int, zarr_format: int) -> None:
    """One pyramid level: chunk = tile (format 2) or shard = tile with tile/2 inner chunks (3)."""
    lead = shape[:-2]
    unit = (*lead, tile, tile)
    common: dict[str, Any] = {"name": name, "shape": shape, "dtype": "uint8", "fill_value": 0}
    if zarr_format == 2:
        # NGFF 0.4 requires "/" between chunk indices.
        group.create_array(**common, chunks=unit, chunk_key_encoding={"name": "v2", "separator": "/"})
    else:
        inner = tile // 2 if tile % 2 == 0 and tile >= 64 else tile
        group.create_array(
            **common,
            chunks=(*lead, inner, inner),
            shards=unit,
            dimension_names=["c", "y", "x"][-len(shape) :],
        )
