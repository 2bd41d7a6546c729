"""Network architectures and the model cards that turn them into usable tissue models.

``create_model(name, **kwargs)`` is the one factory (in the spirit of timm): a card's
``architecture`` block is passed to it verbatim.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from wsi_espnet.models.espnet import ESPNet, ESPNetC

MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {"espnet": ESPNet, "espnet-c": ESPNetC}


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Instantiate a registered architecture by name (``espnet`` or ``espnet-c``)."""
    try:
        factory = MODEL_REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; known: {', '.join(sorted(MODEL_REGISTRY))}"
        ) from None
    return factory(**kwargs)


__all__ = ["MODEL_REGISTRY", "ESPNet", "ESPNetC", "create_model"]
