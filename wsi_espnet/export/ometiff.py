"""Pyramidal OME-TIFF of the label map (and optionally the class scores) for QuPath, Fiji and napari.

Layout, as Bio-Formats 6+ expects a pyramid: one full-resolution image, its reduced levels
(the store's pyramid, factor 2) as SubIFDs, 512 x 512 tiles, zlib (deflate) compression, and
``PhysicalSizeX/Y`` in µm at the analysis resolution (plus TIFF resolution tags for readers
that ignore OME-XML). The file is written tile row by tile row from the zarr arrays, so memory
stays at one 512-pixel band whatever the slide size.

Class names live in the OME-XML: the image ``Description`` lists ``value=name`` pairs, and a
``MapAnnotation`` holds the same pairs plus the model name and weights hash. QuPath shows the
label image as one uint8 channel (values 0..n-1) and does not display OME annotations; the names
are visible in Fiji (*Image > Show Info*) or with ``tiffcomment`` / Bio-Formats ``showinf -omexml``.
For classified regions inside QuPath, import the GeoJSON instead.

Scores (``include_scores=True``) go to a *separate* file ``<stem>.scores.ome.tif`` (C channels
named after the classes, uint8 = round(softmax x 255)) rather than a second image in the same
file: QuPath opens a multi-image file through an image-picking dialog, and most users only want
the labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr

from wsi_espnet.errors import OutputError
from wsi_espnet.store import SlideStore, open_store

TILE = 512


def write_ome_tiff(store: str | Path, path: str | Path, include_scores: bool = False) -> list[Path]:
    """Write the labels to ``path`` (and ``<stem>.scores.ome.tif`` beside it) and return the files."""
    outputs = open_store(store)
    path = Path(path)
    labels = [outputs.labels(level) for level in range(outputs.n_levels)]
    legend = "; ".join(f"{c.value}={c.name}" for c in outputs.classes)
    metadata = {
        "axes": "YX",
        "Name": f"{outputs.stem} tissue classes",
        "Description": f"wsi-espnet tissue class labels (uint8): {legend}",
        "Channel": {"Name": ["tissue class"]},
        "MapAnnotation": {
            **{str(c.value): c.name for c in outputs.classes},
            **_model_annotation(outputs),
        },
    }
    written = [_write_pyramid(path, labels, outputs, metadata)]
    if include_scores:
        scores = [outputs.scores(level) for level in range(outputs.n_levels)]
        scores_metadata = {
            "axes": "CYX",
            "Name": f"{outputs.stem} class scores",
            "Description": "wsi-espnet class scores: uint8 = round(softmax probability x 255)",
            "Channel": {"Name": [c.name for c in outputs.classes]},
            "MapAnnotation": _model_annotation(outputs),
        }
        scores_path = path.with_name(f"{outputs.stem}.scores.ome.tif")
        written.append(_write_pyramid(scores_path, scores, outputs, scores_metadata))
    return written


def _model_annotation(outputs: SlideStore) -> dict[str, str]:
    model = outputs.attrs.get("model", {})
    return {"model": str(model.get("name", "")), "model_sha256": str(model.get("sha256", ""))}


def _write_pyramid(
    path: Path, levels: list[zarr.Array], outputs: SlideStore, metadata: dict[str, Any]
) -> Path:
    """Base image with OME-XML, reduced levels as SubIFDs; every image written from a tile generator."""
    base = levels[0]
    try:
        with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
            for level, array in enumerate(levels):
                pixels_per_cm = 1e4 / outputs.level_mpp(level)
                if level == 0:
                    metadata = {
                        **metadata,
                        "PhysicalSizeX": outputs.mpp,
                        "PhysicalSizeXUnit": "µm",
                        "PhysicalSizeY": outputs.mpp,
                        "PhysicalSizeYUnit": "µm",
                    }
                tif.write(
                    _tiles(array),
                    shape=array.shape,
                    dtype=base.dtype,
                    tile=(TILE, TILE),
                    compression="zlib",
                    photometric="minisblack",
                    resolution=(pixels_per_cm, pixels_per_cm),
                    resolutionunit="CENTIMETER",
                    subifds=len(levels) - 1 if level == 0 else None,
                    subfiletype=1 if level > 0 else 0,
                    metadata=metadata if level == 0 else None,
                )
    except OSError as error:
        raise OutputError(f"cannot write OME-TIFF ({error.strerror})", path) from error
    return path


def _tiles(array: zarr.Array) -> Iterator[np.ndarray]:
    """Tiles of a (y, x) or (c, y, x) array in TIFF order (plane, tile row, tile column), edge tiles padded.

    One band of ``TILE`` rows per plane is read at a time, so memory is ``TILE x width``.
    """
    planes = [()] if array.ndim == 2 else [(plane,) for plane in range(array.shape[0])]
    height, width = array.shape[-2:]
    for plane in planes:
        for y0 in range(0, height, TILE):
            band = array[(*plane, slice(y0, y0 + TILE), slice(None))]
            for x0 in range(0, width, TILE):
                tile = np.zeros((TILE, TILE), dtype=array.dtype)
                piece = band[:, x0 : x0 + TILE]
                tile[: piece.shape[0], : piece.shape[1]] = piece
                yield tile
