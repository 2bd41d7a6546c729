"""The stitched result of one slide: an OME-Zarr store written chunk by chunk, and a resume log.

Layout of ``<stem>.ome.zarr`` (all at analysis resolution ``mpp``)::

    /                  image: per-class scores uint8 (c, y, x) = round(softmax * 255), a pyramid
    /labels/tissue     image-label: argmax class uint8 (y, x), the same pyramid, class colours

Two on-disk formats, so the store opens in today's viewers and in NGFF 0.5 tools:

* ``zarr_format=2`` (default) writes OME-NGFF 0.4: one file per chunk, chunk = one tile.
* ``zarr_format=3`` writes OME-NGFF 0.5 (metadata under ``"ome"``) with sharding. A shard is the
  unit of storage; writing part of a shard rewrites the whole shard (read-modify-write), so two
  processes writing different inner chunks of one shard would lose one write. The shard edge is
  therefore the tile: the pipeline writes one whole shard per tile, which needs no read and no
  lock, and the inner chunks (tile / 2) only make viewer reads finer.

The NGFF metadata is written here rather than with ome-zarr-py's writers because those put
pixel offsets where the scales belong; ours are in micrometres per pixel on every level.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr

from wsi_espnet.errors import OutputError
from wsi_espnet.outputs import write_json_atomic

ATTRS_KEY = "wsi_espnet"
STATUSES = ("running", "complete")
LABEL_NAME = "tissue"
MIN_PYRAMID_SIDE = 512


def _rgb(color: Any) -> list[int]:
    """Normalise a class colour given as ``"#rrggbb"`` or a sequence of 3-4 ints to [r, g, b]."""
    if isinstance(color, str):
        text = color.lstrip("#")
        if len(text) != 6:
            raise ValueError(f"class colour {color!r} is not '#rrggbb'")
        return [int(text[i : i + 2], 16) for i in (0, 2, 4)]
    values = [int(v) for v in color]
    if len(values) not in (3, 4) or not all(0 <= v <= 255 for v in values):
        raise ValueError(f"class colour {color!r} is not 3-4 values in 0..255")
    return values[:3]


def _class_dicts(classes: Iterable[Any]) -> list[dict[str, Any]]:
    """Classes as JSON dicts ``{"value", "name", "color": [r, g, b]}``, from dicts or objects."""
    out = []
    for cls in classes:
        get = cls.get if isinstance(cls, Mapping) else lambda key, c=cls: getattr(c, key)
        out.append({"value": int(get("value")), "name": str(get("name")), "color": _rgb(get("color"))})
    return out


def pyramid_shapes(shape: tuple[int, int]) -> list[tuple[int, int]]:
    """Level shapes, halving (rounding up) until the long side is at most 512 px."""
    shapes = [tuple(int(s) for s in shape)]
    while max(shapes[-1]) > MIN_PYRAMID_SIDE:
        shapes.append(tuple((s + 1) // 2 for s in shapes[-1]))
    return shapes  # type: ignore[return-value]


def _multiscale(
    name: str, axes: list[str], mpp: float, n_levels: int, method: str, version: str | None
) -> dict:
    """One NGFF ``multiscales`` entry: scale in µm/px per level, axes with units."""
    axis_meta = [
        {"name": a, "type": "channel"} if a == "c" else {"name": a, "type": "space", "unit": "micrometer"}
        for a in axes
    ]
    datasets = []
    for level in range(n_levels):
        step = mpp * 2**level
        scale = [1.0 if a == "c" else step for a in axes]
        datasets.append(
            {"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        )
    entry: dict[str, Any] = {"name": name, "axes": axis_meta, "datasets": datasets, "type": method}
    if version is not None:
        entry["version"] = version
    return entry


def _omero(classes: list[dict]) -> dict:
    """Channel rendering hints (one channel per class, its colour) for OMERO-aware viewers."""
    channels = [
        {
            "label": c["name"],
            "color": "".join(f"{v:02X}" for v in c["color"]),
            "window": {"min": 0, "max": 255, "start": 0, "end": 255},
            "active": True,
            "coefficient": 1,
            "family": "linear",
            "inverted": False,
        }
        for c in classes
    ]
    return {"channels": channels, "rdefs": {"model": "color"}}


def _image_label(classes: list[dict], version: str | None) -> dict:
    """``image-label`` block: colours and names keyed by label value, pointing back at the image."""
    block: dict[str, Any] = {
        "colors": [{"label-value": c["value"], "rgba": [*c["color"], 255]} for c in classes],
        "properties": [{"label-value": c["value"], "name": c["name"]} for c in classes],
        "source": {"image": "../../"},
    }
    if version is not None:
        block["version"] = version
    return block


def _wrap(attrs: dict, zarr_format: int) -> dict:
    """NGFF 0.4 keeps metadata at the top level; 0.5 nests it under ``"ome"`` with the version."""
    return attrs if zarr_format == 2 else {"ome": {"version": "0.5", **attrs}}


class SlideStore:
    """One slide's OME-Zarr store; picklable (by path) so Dask workers can write their chunks."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = path
        self._group = group

    def __reduce__(self) -> tuple:
        return (SlideStore.open, (str(self.path),))

    @classmethod
    def create(
        cls,
        path: str | Path,
        shape: tuple[int, int],
        tile: int,
        mpp: float,
        classes: Iterable[Any],
        zarr_format: int = 2,
        attrs: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
    ) -> SlideStore:
        """Create the empty store (all levels, full metadata, ``status: running``).

        ``attrs`` fills the rest of the ``wsi_espnet`` block: ``model`` (``{"name", "sha256"}``),
        ``halo`` (int) and ``slide`` (any JSON-able dict, e.g. ``Slide.metadata()``). Unwritten
        chunks read as 0 (the background class), so chunks without tissue are never written.
        """
        path = Path(path)
        if zarr_format not in (2, 3):
            raise OutputError(f"zarr_format must be 2 or 3, not {zarr_format}", path)
        if path.exists() and not overwrite:
            raise OutputError("already exists; remove it or overwrite it", path)
        class_list = _class_dicts(classes)
        shapes = pyramid_shapes(shape)
        version = "0.4" if zarr_format == 2 else None
        extra = dict(attrs or {})
        unknown = set(extra) - {"model", "halo", "slide"}
        if unknown:
            raise ValueError(f"unknown store attributes {sorted(unknown)}; use model, halo, slide")
        model = extra.get("model") or {}
        block = {
            "model": {"name": str(model.get("name", "")), "sha256": str(model.get("sha256", ""))},
            "classes": class_list,
            "mpp": float(mpp),
            "tile": int(tile),
            "halo": int(extra.get("halo", 0)),
            "slide": dict(extra.get("slide") or {}),
            "status": "running",
        }
        root_meta = {
            "multiscales": [_multiscale("scores", ["c", "y", "x"], mpp, len(shapes), "mean 2x2", version)],
            "omero": _omero(class_list),
        }
        root = zarr.create_group(
            str(path),
            zarr_format=zarr_format,
            overwrite=True,
            attributes={**_wrap(root_meta, zarr_format), ATTRS_KEY: block},
        )
        labels_group = root.create_group("labels", attributes=_wrap({"labels": [LABEL_NAME]}, zarr_format))
        label_meta = {
            "multiscales": [_multiscale(LABEL_NAME, ["y", "x"], mpp, len(shapes), "mode 2x2", version)],
            "image-label": _image_label(class_list, version),
        }
        tissue = labels_group.create_group(LABEL_NAME, attributes=_wrap(label_meta, zarr_format))
        n_classes = len(class_list)
        for level, (h, w) in enumerate(shapes):
            _create_array(root, str(level), (n_classes, h, w), tile, zarr_format)
            _create_array(tissue, str(level), (h, w), tile, zarr_format)
        return cls(path, root)

    @classmethod
    def open(cls, path: str | Path) -> SlideStore:
        """Open an existing store for reading and writing; not ours → :class:`OutputError`."""
        path = Path(path)
        try:
            group = zarr.open_group(str(path), mode="r+")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as err:
            raise OutputError("is not a zarr group (not a wsi-espnet store)", path) from err
        if ATTRS_KEY not in group.attrs:
            raise OutputError(f"has no '{ATTRS_KEY}' attributes (not a wsi-espnet store)", path)
        return cls(path, group)

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
        return float(self.attrs["mpp"])

    @property
    def tile(self) -> int:
        return int(self.attrs["tile"])

    @property
    def classes(self) -> list[dict[str, Any]]:
        return list(self.attrs["classes"])

    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 (height, width) at analysis resolution."""
        return tuple(self.labels(0).shape)  # type: ignore[return-value]

    @property
    def n_levels(self) -> int:
        return len(pyramid_shapes(self.shape))

    def labels(self, level: int = 0) -> zarr.Array:
        """The argmax class map (y, x) uint8 of pyramid ``level``."""
        return self._group[f"labels/{LABEL_NAME}/{level}"]  # type: ignore[return-value]

    def scores(self, level: int = 0) -> zarr.Array:
        """The per-class scores (c, y, x) uint8 of pyramid ``level``."""
        return self._group[str(level)]  # type: ignore[return-value]

    def write_chunk(self, chunk_index: tuple[int, int], scores: np.ndarray, labels: np.ndarray) -> None:
        """Write exactly level-0 chunk ``(iy, ix)``: whole chunks (shards) only, so no locks.

        ``scores`` is (C, h, w) and ``labels`` (h, w), where (h, w) is the chunk clipped to
        the array (smaller at the bottom and right edges).
        """
        iy, ix = chunk_index
        tile = self.tile
        height, width = self.shape
        y0, x0 = iy * tile, ix * tile
        h, w = min(tile, height - y0), min(tile, width - x0)
        if h <= 0 or w <= 0 or y0 < 0 or x0 < 0:
            raise ValueError(f"chunk {chunk_index} is outside the {height}x{width} grid of {tile}")
        if labels.shape != (h, w) or scores.shape != (len(self.classes), h, w):
            raise ValueError(f"chunk {chunk_index} needs scores (C, {h}, {w}) and labels ({h}, {w})")
        self.scores(0)[:, y0 : y0 + h, x0 : x0 + w] = scores.astype(np.uint8, copy=False)
        self.labels(0)[y0 : y0 + h, x0 : x0 + w] = labels.astype(np.uint8, copy=False)

    def build_pyramid(self, client: Any = None) -> None:
        """Fill levels 1..n from level 0 with Dask, one output chunk per task (memory bounded).

        Each task reads a 2x2 block of output chunks from the level above (at most
        ``4 * C * tile**2`` bytes) and writes one whole output chunk, so tasks never share a
        chunk or shard. Labels take the mode of each 2x2 block, scores the mean.
        """
        for level in range(1, self.n_levels):
            pairs = [
                _downsample(self.scores(level - 1), self.scores(level), _mean_2x2),
                _downsample(self.labels(level - 1), self.labels(level), _mode_2x2),
            ]
            # da.store is what da.to_zarr calls for an existing array; called directly it keeps
            # our blocks, which are already aligned with the target's write units.
            tasks = da.store([s for s, _ in pairs], [t for _, t in pairs], lock=False, compute=False)
            dask.compute(tasks, scheduler=client if client is not None else "threads")


def _create_array(group: zarr.Group, name: str, shape: tuple[int, ...], tile: int, zarr_format: int) -> None:
    """One pyramid level: chunk = tile (format 2) or shard = tile with tile/2 inner chunks (3)."""
    lead = shape[:-2]
    write_unit = (*lead, tile, tile)
    common: dict[str, Any] = {"name": name, "shape": shape, "dtype": "uint8", "fill_value": 0}
    if zarr_format == 2:
        # NGFF 0.4 requires "/" between chunk indices.
        group.create_array(**common, chunks=write_unit, chunk_key_encoding={"name": "v2", "separator": "/"})
    else:
        inner = tile // 2 if tile % 2 == 0 and tile >= 64 else tile
        group.create_array(
            **common,
            chunks=(*lead, inner, inner),
            shards=write_unit,
            dimension_names=["c", "y", "x"][-len(shape) :],
        )


def _write_unit(array: zarr.Array) -> tuple[int, ...]:
    """The smallest region one process may write alone: the shard if sharded, else the chunk."""
    return tuple(array.shards or array.chunks)


def _downsample(
    source: zarr.Array, target: zarr.Array, reduce: Callable[[np.ndarray], np.ndarray]
) -> tuple[da.Array, zarr.Array]:
    """Dask array of ``target``'s content, one block per target write unit (chunk or shard)."""
    unit = _write_unit(target)
    read_chunks = (*unit[:-2], 2 * unit[-2], 2 * unit[-1])
    src = da.from_zarr(source, chunks=read_chunks)
    out_chunks = (*src.chunks[:-2], *(tuple((c + 1) // 2 for c in dim) for dim in src.chunks[-2:]))
    result = src.map_blocks(reduce, chunks=out_chunks, dtype=np.uint8)
    assert result.shape == target.shape, (result.shape, target.shape)
    return result, target


def _blocks_2x2(block: np.ndarray) -> np.ndarray:
    """The four pixels of every 2x2 block stacked on a new first axis; odd edges repeat."""
    pad = [(0, 0)] * (block.ndim - 2) + [(0, block.shape[-2] % 2), (0, block.shape[-1] % 2)]
    even = np.pad(block, pad, mode="edge")
    return np.stack([even[..., dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)])


def _mean_2x2(block: np.ndarray) -> np.ndarray:
    """Mean of each 2x2 block, rounded half up (an odd edge averages the pixels that exist)."""
    total = _blocks_2x2(block).astype(np.uint16).sum(axis=0)
    return ((total + 2) // 4).astype(np.uint8)


def _mode_2x2(block: np.ndarray) -> np.ndarray:
    """Most frequent label of each 2x2 block; ties go to the smaller label (as scipy's mode).

    Vectorised: each of the four candidates scores ``count * 256 + (255 - value)``, so the
    largest score is the most frequent value and, among equals, the smallest.
    """
    four = _blocks_2x2(block)
    counts = (four[:, None] == four[None, :]).sum(axis=1).astype(np.int32)
    score = counts * 256 + (255 - four.astype(np.int32))
    return np.take_along_axis(four, score.argmax(axis=0)[None], axis=0)[0]


class ProgressLog:
    """Which chunks are safely on disk: one small JSON file per finished batch.

    A record is written to a temporary file and renamed into place (``os.replace`` is atomic),
    so a worker killed mid-write leaves no record and those chunks are simply redone.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def record(self, batch_id: str, chunk_indices: Iterable[Sequence[int]]) -> None:
        """Mark ``chunk_indices`` (iy, ix) as written; call after the batch's chunks are on disk."""
        indices = [[int(iy), int(ix)] for iy, ix in chunk_indices]
        write_json_atomic(self.directory / f"batch-{batch_id}.json", indices)

    def done(self) -> set[tuple[int, int]]:
        """All chunk indices recorded so far (empty when the directory does not exist yet)."""
        if not self.directory.is_dir():
            return set()
        chunks: set[tuple[int, int]] = set()
        for record in self.directory.glob("batch-*.json"):
            chunks.update((iy, ix) for iy, ix in json.loads(record.read_text()))
        return chunks
