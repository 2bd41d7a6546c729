"""Network architectures and the model cards that turn them into usable tissue models.

``create_model(name, **kwargs)`` is the one factory (in the spirit of timm): a card's
``architecture`` block is passed to it verbatim.

The architectures are named here without importing them: reading a card (``segment``'s client,
``wsi-espnet models``) needs no torch, whose import costs seconds; the classes load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

#: architecture name -> its class in :mod:`wsi_espnet.models.espnet`
ARCHITECTURES: dict[str, str] = {"espnet": "ESPNet", "espnet-c": "ESPNetC"}


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Instantiate a registered architecture by name (``espnet`` or ``espnet-c``)."""
    try:
        class_name = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
    return __getattr__(class_name)(**kwargs)


def __getattr__(name: str) -> Any:
    """``from wsi_espnet.models import ESPNet`` (and ESPNetC) imports torch only then."""
    if name in ARCHITECTURES.values():
        return getattr(importlib.import_module("wsi_espnet.models.espnet"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ARCHITECTURES", "ESPNet", "ESPNetC", "create_model"]  # the two classes: see __getattr__
