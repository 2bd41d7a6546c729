"""Exports of one finished slide: GeoJSON for QuPath, OME-TIFF for viewers, a PNG overlay and an HTML report.

:func:`export_all` opens the slide's store once (:func:`wsi_espnet.store.open_store`, read-only
and checked) and hands the open store to each writer; the writers read it chunk by chunk, never
the full map, and share one read of ``<stem>.stats.json``. Each writer also accepts a path, for
use on its own. Label value 0 is background: it is never exported as a class.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsi_espnet.config import OutputSettings
from wsi_espnet.errors import ConfigError, WsiEspnetError
from wsi_espnet.export.geojson import Frame, write_geojson
from wsi_espnet.export.ometiff import write_ome_tiff
from wsi_espnet.export.overlay import write_overlay
from wsi_espnet.export.report import write_report
from wsi_espnet.outputs import FORMATS
from wsi_espnet.store import SlideStore, open_store

logger = logging.getLogger(__name__)

THUMBNAIL_SIDE = 1600  # px: large enough to read the overlay, small enough to embed in the report


def read_slide_thumbnail(store: SlideStore, max_side: int = THUMBNAIL_SIDE) -> np.ndarray | None:
    """An RGB thumbnail of the original slide, or None (white background) when it cannot be read.

    A missing slide is not an error here: results are often exported on another machine than
    the one that holds the slides.
    """
    slide = store.attrs.get("slide", {})
    path = slide.get("path")
    if not path or not Path(path).is_file():
        logger.warning("slide %s not found; the overlay is drawn on white", path)
        return None
    from wsi_espnet.slide import open_slide  # the slide reader is only needed when the slide is there

    width, height = slide.get("dimensions") or (max_side, max_side)
    mpp = store.slide_mpp * max(width, height) / max_side
    try:
        with open_slide(path, slide_mpp=store.slide_mpp) as opened:
            return opened.thumbnail(mpp)
    except WsiEspnetError as error:
        logger.warning("cannot read a thumbnail of %s (%s); the overlay is drawn on white", path, error)
        return None


def export_all(
    output_dir: str | Path,
    formats: Sequence[str] | None = None,
    settings: OutputSettings | None = None,
    slide_thumbnail: np.ndarray | None = None,
) -> dict[str, list[Path]]:
    """Write the requested exports next to the store and return ``{format: [paths]}``.

    ``output_dir`` is ``OUTDIR/<stem>`` (or the store itself); ``formats`` (default: the
    settings', which default to all) picks the exports. Files: ``<stem>.geojson``,
    ``<stem>.labels.ome.tif`` (palette), ``<stem>.labels-rgb.ome.tif``
    (+ ``<stem>.scores.ome.tif``), ``<stem>.overlay.png``,
    ``<stem>.report.html``. Without ``slide_thumbnail`` the slide named in the store is read
    for the overlay background when it is still there.
    """
    settings = settings or OutputSettings()
    formats = settings.formats if formats is None else tuple(formats)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ConfigError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    store = open_store(output_dir)
    base = store.directory / store.stem
    thumbnail = slide_thumbnail
    if thumbnail is None and ("png" in formats or "html" in formats):
        thumbnail = read_slide_thumbnail(store)
    written: dict[str, list[Path]] = {}
    if "geojson" in formats:
        options: dict[str, Any] = {}
        if settings.geojson_min_area_um2 is not None:
            options["min_area_um2"] = settings.geojson_min_area_um2
        if settings.geojson_uncertain and store.confidence(0) is not None:
            options["frame"] = Frame(uncertain_below=settings.low_confidence)
        written["geojson"] = [
            write_geojson(store, f"{base}.geojson", per_region=settings.geojson_per_region, **options)
        ]
    if "ometiff" in formats:
        written["ometiff"] = write_ome_tiff(store, f"{base}.labels.ome.tif", settings.include_scores)
    if "png" in formats:
        written["png"] = [write_overlay(store, f"{base}.overlay.png", thumbnail, store.read_stats())]
    if "html" in formats:
        written["html"] = [write_report(store, f"{base}.report.html", thumbnail)]
    return written
