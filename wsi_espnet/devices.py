"""Which torch device a run uses: one rule for segmentation, training and evaluation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsi_espnet.errors import ConfigError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → the first CUDA device if there is one, else the CPU; CUDA without one is refused.

    Torch is imported here, not with the module: ``segment``'s client imports the modules
    that submit work (and so this one) but never resolves a device itself.
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r} is not a device (auto, cpu, cuda or cuda:N)") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} but no CUDA device is available")
    return resolved


def is_cuda(device: torch.device | str) -> bool:
    """``cuda`` or ``cuda:N``, given as a ``torch.device`` or as its name (no torch import)."""
    return str(device).partition(":")[0] == "cuda"
