"""Exports of one finished slide: GeoJSON for QuPath, OME-TIFF for viewers, a PNG overlay and an HTML report.

The exporters read the slide's OME-Zarr store with zarr directly, by its fixed layout, rather than
through ``store.py``: an export must keep working on stores written by older versions and by other
processes, and only needs to *read* a few arrays chunk by chunk. :func:`open_outputs` is the one
place that knows the layout:

* ``<dir>/<stem>.ome.zarr`` root group, attribute ``wsi_espnet`` (model, classes, ``mpp``, ``tile``,
  ``slide`` {path, mpp, dimensions, bounds_offset}, status);
* labels ``labels/tissue/0..n-1`` (uint8, (y, x), each level half the previous one);
* scores ``0..n-1`` (uint8, (c, y, x));
* ``<dir>/<stem>.stats.json`` (statistics) and ``<dir>/run.json`` (run parameters), both optional.

Label value 0 is background (glass, or a chunk that was never inferred because it has no tissue):
it is never exported as a class.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_espnet.errors import ConfigError, OutputError, WsiEspnetError
from wsi_espnet.models.cards import ClassInfo

logger = logging.getLogger(__name__)

BACKGROUND = 0
STORE_SUFFIX = ".ome.zarr"
FORMATS = ("geojson", "ometiff", "png", "html")
THUMBNAIL_SIDE = 1600  # px: large enough to read the overlay, small enough to embed in the report


@dataclass(frozen=True)
class SlideOutputs:
    """One slide's results on disk, opened read-only, with the metadata every exporter needs."""

    store_path: Path
    root: zarr.Group
    attrs: dict[str, Any]
    classes: tuple[ClassInfo, ...]
    mpp: float  # analysis µm/px
    slide_mpp: float  # level-0 µm/px
    n_levels: int

    @property
    def stem(self) -> str:
        return self.store_path.name[: -len(STORE_SUFFIX)]

    @property
    def directory(self) -> Path:
        return self.store_path.parent

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
    def tissue_classes(self) -> tuple[ClassInfo, ...]:
        """The classes that can be exported (all but background)."""
        return tuple(c for c in self.classes if c.value != BACKGROUND)

    def labels(self, level: int = 0) -> zarr.Array:
        return self.root[f"labels/tissue/{level}"]

    def scores(self, level: int = 0) -> zarr.Array:
        return self.root[str(level)]

    def level_mpp(self, level: int) -> float:
        """µm per pixel of pyramid ``level`` (each level halves the resolution)."""
        return self.mpp * 2**level

    def finest_level_within(self, max_side: int) -> int:
        """The finest pyramid level whose larger side is at most ``max_side`` (else the coarsest)."""
        for level in range(self.n_levels):
            if max(self.labels(level).shape) <= max_side:
                return level
        return self.n_levels - 1

    def iter_label_chunks(self, level: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(y0, x0, block)`` for every stored block (shard, else chunk), so memory stays one block."""
        array = self.labels(level)
        height, width = array.shape
        chunk_h, chunk_w = array.shards or array.chunks
        for y0 in range(0, height, chunk_h):
            for x0 in range(0, width, chunk_w):
                yield y0, x0, array[y0 : y0 + chunk_h, x0 : x0 + chunk_w]

    @property
    def stats_path(self) -> Path:
        return self.directory / f"{self.stem}.stats.json"

    @property
    def run_path(self) -> Path:
        return self.directory / "run.json"

    def read_stats(self) -> dict[str, Any] | None:
        """``<stem>.stats.json``, or None when statistics were not written."""
        return _read_json(self.stats_path)

    def read_run(self) -> dict[str, Any] | None:
        """``run.json`` of the output folder, or None when absent."""
        return _read_json(self.run_path)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OutputError(f"not valid JSON ({error})", path) from error


def find_store(target: str | Path) -> Path:
    """Resolve ``<dir>/<stem>.ome.zarr``, ``<dir>/<stem>`` or a folder holding exactly one store."""
    target = Path(target)
    if target.name.endswith(STORE_SUFFIX) and target.is_dir():
        return target
    with_suffix = target.with_name(target.name + STORE_SUFFIX)
    if with_suffix.is_dir():
        return with_suffix
    if target.is_dir():
        stores = sorted(target.glob(f"*{STORE_SUFFIX}"))
        if len(stores) == 1:
            return stores[0]
        if stores:
            names = ", ".join(s.name[: -len(STORE_SUFFIX)] for s in stores)
            raise OutputError(f"holds several slide stores ({names}); name one as DIR/<stem>", target)
    raise OutputError(
        f"no {STORE_SUFFIX} store found (expected DIR/<stem> or DIR/<stem>{STORE_SUFFIX})", target
    )


def open_outputs(target: str | Path) -> SlideOutputs:
    """Open one slide's store read-only and check it carries the metadata the exporters rely on."""
    store_path = find_store(target)
    try:
        root = zarr.open_group(store_path, mode="r")
    except (FileNotFoundError, ValueError, zarr.errors.GroupNotFoundError) as error:
        raise OutputError(f"not a zarr group ({error})", store_path) from error
    attrs = root.attrs.get("wsi_espnet")
    if not isinstance(attrs, dict):
        raise OutputError("not a wsi-espnet store (root attribute 'wsi_espnet' missing)", store_path)
    try:
        classes = tuple(
            ClassInfo(int(c["value"]), str(c["name"]), tuple(int(v) for v in c["color"]))
            for c in attrs["classes"]
        )
        mpp = float(attrs["mpp"])
        slide_mpp = float(attrs["slide"]["mpp"])
    except (KeyError, TypeError, ValueError) as error:
        raise OutputError(f"incomplete 'wsi_espnet' metadata ({error!r})", store_path) from error
    if not (math.isfinite(mpp) and math.isfinite(slide_mpp) and mpp > 0 and slide_mpp > 0):
        raise OutputError(f"invalid resolution in metadata (mpp={mpp}, slide mpp={slide_mpp})", store_path)
    n_levels = 0
    while f"labels/tissue/{n_levels}" in root:
        n_levels += 1
    if n_levels == 0:
        raise OutputError("no label map at labels/tissue/0", store_path)
    return SlideOutputs(store_path, root, attrs, classes, mpp, slide_mpp, n_levels)


def read_slide_thumbnail(outputs: SlideOutputs, max_side: int = THUMBNAIL_SIDE) -> np.ndarray | None:
    """An RGB thumbnail of the original slide, or None (white background) when it cannot be read.

    A missing slide is not an error here: results are often exported on another machine than
    the one that holds the slides.
    """
    slide = outputs.attrs.get("slide", {})
    path = slide.get("path")
    if not path or not Path(path).is_file():
        logger.warning("slide %s not found; the overlay is drawn on white", path)
        return None
    from wsi_espnet.slide import open_slide  # the slide reader is only needed when the slide is there

    width, height = slide.get("dimensions") or (max_side, max_side)
    mpp = outputs.slide_mpp * max(width, height) / max_side
    try:
        with open_slide(path, slide_mpp=outputs.slide_mpp) as opened:
            return opened.thumbnail(mpp)
    except WsiEspnetError as error:
        logger.warning("cannot read a thumbnail of %s (%s); the overlay is drawn on white", path, error)
        return None


def export_all(
    output_dir: str | Path,
    formats: Sequence[str] = FORMATS,
    *,
    slide_thumbnail: np.ndarray | None = None,
    per_region: bool = False,
    min_area_um2: float | None = None,
    simplify_px: float | None = None,
    include_scores: bool = False,
) -> dict[str, list[Path]]:
    """Write the requested exports next to the store and return ``{format: [paths]}``.

    ``output_dir`` is ``OUTDIR/<stem>`` (or the store itself). Files: ``<stem>.geojson``,
    ``<stem>.labels.ome.tif`` (+ ``<stem>.scores.ome.tif``), ``<stem>.overlay.png``,
    ``<stem>.report.html``. Without ``slide_thumbnail`` the slide named in the store is read
    for the overlay background when it is still there.
    """
    # Imported here: the writers import the reader helpers above from this package.
    from wsi_espnet.export.geojson import write_geojson
    from wsi_espnet.export.ometiff import write_ome_tiff
    from wsi_espnet.export.overlay import write_overlay
    from wsi_espnet.export.report import write_report

    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ConfigError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    outputs = open_outputs(output_dir)
    base = outputs.directory / outputs.stem
    thumbnail = slide_thumbnail
    if thumbnail is None and ("png" in formats or "html" in formats):
        thumbnail = read_slide_thumbnail(outputs)
    written: dict[str, list[Path]] = {}
    if "geojson" in formats:
        options = {"per_region": per_region}
        if min_area_um2 is not None:
            options["min_area_um2"] = min_area_um2
        if simplify_px is not None:
            options["simplify_px"] = simplify_px
        written["geojson"] = [write_geojson(outputs.store_path, f"{base}.geojson", **options)]
    if "ometiff" in formats:
        written["ometiff"] = write_ome_tiff(outputs.store_path, f"{base}.labels.ome.tif", include_scores)
    if "png" in formats:
        stats = outputs.read_stats()
        written["png"] = [write_overlay(outputs.store_path, f"{base}.overlay.png", thumbnail, stats)]
    if "html" in formats:
        written["html"] = [write_report(outputs.store_path, f"{base}.report.html", thumbnail)]
    return written
