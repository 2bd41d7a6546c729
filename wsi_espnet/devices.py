"""Which torch device a run uses: one rule for segmentation, training and evaluation."""

from __future__ import annotations

import torch

from wsi_espnet.errors import ConfigError


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → the first CUDA device if there is one, else the CPU; CUDA without one is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r} is not a device (auto, cpu, cuda or cuda:N)") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} but no CUDA device is available")
    return resolved
