"""The class table shared by model cards, the store, statistics and exports.

Kept apart from ``models/cards.py`` (which needs torch) so that reading a finished store, on a
machine without the model, imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: Label value 0: glass, or a chunk never inferred because it has no tissue; never exported.
BACKGROUND = 0


@dataclass(frozen=True)
class ClassInfo:
    """One output class: its label value, a machine-friendly name and an RGB display colour."""

    value: int
    name: str
    color: tuple[int, int, int]

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "name": self.name, "color": list(self.color)}


def as_class_infos(classes: Iterable[Any]) -> tuple[ClassInfo, ...]:
    """Classes from ``ClassInfo`` objects or JSON dicts ``{"value", "name", "color": [r, g, b]}``."""
    out = []
    for cls in classes:
        get = cls.get if isinstance(cls, Mapping) else lambda key, c=cls: getattr(c, key)
        color = tuple(int(v) for v in get("color"))
        if len(color) not in (3, 4) or not all(0 <= v <= 255 for v in color):
            raise ValueError(f"class colour {color!r} is not 3-4 values in 0..255")
        out.append(ClassInfo(int(get("value")), str(get("name")), color[:3]))  # type: ignore[arg-type]
    return tuple(out)
