"""The artifact kinds of QC and the ``--qc`` modes: names only, so the store and exporters stay light.

Values of the ``labels/artifacts`` image-label: 0 none, 1 pen ink, 2 out of focus (blur),
3 tissue fold. The detector lives in :mod:`wsi_espnet.qc`.
"""

from __future__ import annotations

from wsi_espnet.classes import ClassInfo

ARTIFACTS_NAME = "artifacts"  # the image-label under labels/
NONE, PEN, BLUR, FOLD = 0, 1, 2, 3
#: Display colours chosen apart from the tissue classes' (and from H&E): ink blue, amber, black-red.
KINDS = (
    ClassInfo(NONE, "none", (0, 0, 0)),
    ClassInfo(PEN, "pen", (0, 200, 255)),
    ClassInfo(BLUR, "blur", (255, 170, 0)),
    ClassInfo(FOLD, "fold", (140, 0, 60)),
)
FLAGGED = tuple(kind for kind in KINDS if kind.value != NONE)
MODES = ("off", "flag", "exclude")
GEOJSON_PREFIX = "Artifact: "  # QuPath class names: "Artifact: pen", ...
GEOJSON_VALUE_OFFSET = 256  # GeoJSON summary values of artifact classes: 256 + kind, apart from labels


def geojson_class(kind: ClassInfo) -> ClassInfo:
    """The QuPath class of an artifact kind (``Artifact: pen``), keyed apart from the tissue classes."""
    return ClassInfo(GEOJSON_VALUE_OFFSET + kind.value, f"{GEOJSON_PREFIX}{kind.name}", kind.color)
