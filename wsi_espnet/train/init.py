"""Where a training run's weights start: the official Cityscapes ESPNet, another card, or random.

Only tensors whose name and shape match are loaded, so a class-count mismatch re-initialises
exactly the layers whose size depends on the number of classes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from wsi_espnet.errors import ConfigError
from wsi_espnet.models import ESPNet
from wsi_espnet.models.cards import load_card
from wsi_espnet.models.espnet import convert_official_state_dict


def default_reference_dir() -> Path:
    """``$WSI_ESPNET_REFERENCE``, else ``../shared/reference/espnet`` relative to the cwd."""
    env = os.environ.get("WSI_ESPNET_REFERENCE")
    return Path(env) if env else Path.cwd().parent / "shared" / "reference" / "espnet"


def _load_matching(
    module: nn.Module, state: dict[str, torch.Tensor], skip: tuple[str, ...] = ()
) -> list[str]:
    """Load every tensor whose name and shape match; return the names left at their init.

    This is how a class-count mismatch re-initialises only the layers whose size depends on the
    number of classes (the classifier and decoder convolutions) and keeps everything else.
    """
    own = module.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape and not k.startswith(skip)}
    module.load_state_dict(kept, strict=False)
    return sorted(k for k in own if k not in kept and not k.endswith("num_batches_tracked"))


def initialise(model: ESPNet, init: str, reference_dir: Path) -> list[str]:
    """Apply ``--init``: official Cityscapes encoder/decoder, another card's weights, or none."""
    if init == "none":
        return []
    if init in ("official-encoder", "official-decoder"):
        kind = init.removeprefix("official-")
        path = Path(reference_dir) / f"{kind}_espnet_p_{model.p}_q_{model.q}.pth"
        if not path.is_file():
            raise ConfigError(f"official {kind} weights not found (set --reference-dir)", path)
        state = convert_official_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        if kind == "encoder":  # Cityscapes classes mean nothing here: keep our classifier random
            return ["encoder." + k for k in _load_matching(model.encoder, state, skip=("classifier.",))]
        return _load_matching(model, state)
    return _load_matching(model, load_card(init).load_state_dict())
