"""The OME-NGFF metadata of a slide store, built in one place.

Two on-disk formats, so the store opens in today's viewers and in NGFF 0.5 tools:
``zarr_format=2`` is OME-NGFF 0.4 (metadata at the top level of each group's attributes),
``zarr_format=3`` is OME-NGFF 0.5 (metadata nested under ``"ome"`` with the version).

Written here rather than with ome-zarr-py's writers because those put pixel offsets where the
scales belong; ours are in micrometres per pixel on every level. The tests validate these dicts
with ``ome-zarr-models``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wsi_espnet.classes import ClassInfo

LABEL_NAME = "tissue"
MIN_PYRAMID_SIDE = 512


def pyramid_shapes(shape: tuple[int, int]) -> list[tuple[int, int]]:
    """Level shapes, halving (rounding up) until the long side is at most 512 px."""
    shapes = [tuple(int(s) for s in shape)]
    while max(shapes[-1]) > MIN_PYRAMID_SIDE:
        shapes.append(tuple((s + 1) // 2 for s in shapes[-1]))
    return shapes  # type: ignore[return-value]


@dataclass(frozen=True)
class NgffMetadata:
    """Attributes of the three groups of a store: the image, ``labels`` and ``labels/tissue``."""

    image: dict[str, Any]
    labels: dict[str, Any]
    label_image: dict[str, Any]


def ngff_metadata(
    classes: tuple[ClassInfo, ...], mpp: float, n_levels: int, zarr_format: int
) -> NgffMetadata:
    """Scores image (c, y, x) with OMERO channel colours, and the ``tissue`` image-label (y, x)."""
    version = "0.4" if zarr_format == 2 else None
    image = {
        "multiscales": [_multiscale("scores", ["c", "y", "x"], mpp, n_levels, "mean 2x2", version)],
        "omero": _omero(classes),
    }
    label_image = {
        "multiscales": [_multiscale(LABEL_NAME, ["y", "x"], mpp, n_levels, "mode 2x2", version)],
        "image-label": _image_label(classes, version),
    }
    return NgffMetadata(
        _wrap(image, zarr_format),
        _wrap({"labels": [LABEL_NAME]}, zarr_format),
        _wrap(label_image, zarr_format),
    )


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


def _omero(classes: tuple[ClassInfo, ...]) -> dict:
    """Channel rendering hints (one channel per class, its colour) for OMERO-aware viewers."""
    channels = [
        {
            "label": c.name,
            "color": "".join(f"{v:02X}" for v in c.color),
            "window": {"min": 0, "max": 255, "start": 0, "end": 255},
            "active": True,
            "coefficient": 1,
            "family": "linear",
            "inverted": False,
        }
        for c in classes
    ]
    return {"channels": channels, "rdefs": {"model": "color"}}


def _image_label(classes: tuple[ClassInfo, ...], version: str | None) -> dict:
    """``image-label`` block: colours and names keyed by label value, pointing back at the image."""
    block: dict[str, Any] = {
        "colors": [{"label-value": c.value, "rgba": [*c.color, 255]} for c in classes],
        "properties": [{"label-value": c.value, "name": c.name} for c in classes],
        "source": {"image": "../../"},
    }
    if version is not None:
        block["version"] = version
    return block


def _wrap(attrs: dict, zarr_format: int) -> dict:
    """NGFF 0.4 keeps metadata at the top level; 0.5 nests it under ``"ome"`` with the version."""
    return attrs if zarr_format == 2 else {"ome": {"version": "0.5", **attrs}}


def confidence_metadata(mpp: float, n_levels: int, zarr_format: int) -> dict[str, Any]:
    """Attributes of the ``confidence`` image (y, x): a multiscale image of its own, beside the
    scores, so NGFF viewers open it as ``<store>/confidence`` (uint8 = round(p * 255))."""
    version = "0.4" if zarr_format == 2 else None
    image = {"multiscales": [_multiscale("confidence", ["y", "x"], mpp, n_levels, "mean 2x2", version)]}
    return _wrap(image, zarr_format)


def extra_label_metadata(
    name: str, values: tuple[ClassInfo, ...], mpp: float, n_levels: int, zarr_format: int
) -> NgffMetadata:
    """Another image-label beside ``tissue`` (e.g. QC's ``artifacts``): its group's attributes as
    ``label_image``, and ``labels`` listing both, for the ``labels`` group; ``image`` is unused."""
    version = "0.4" if zarr_format == 2 else None
    label_image = {
        "multiscales": [_multiscale(name, ["y", "x"], mpp, n_levels, "mode 2x2", version)],
        "image-label": _image_label(values, version),
    }
    return NgffMetadata(
        {}, _wrap({"labels": [LABEL_NAME, name]}, zarr_format), _wrap(label_image, zarr_format)
    )
