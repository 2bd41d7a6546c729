"""Batches of RGB tiles → per-class scores and labels, on CPU or GPU.

One :class:`Predictor` per (weights sha256, device) is cached per process, so each Dask worker
loads a model once however many batches it runs. On CUDA the batch runs under
``torch.inference_mode`` with bf16 autocast and channels_last memory, which is where ESPNet's
many small depth-wise-like convolutions are fastest.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from wsi_espnet.confidence import confidence_u8
from wsi_espnet.devices import resolve_device
from wsi_espnet.models.cards import ModelCard
from wsi_espnet.tta import averaged_probabilities, crop_halo

_CACHE: dict[tuple[str, str], Predictor] = {}
_CACHE_LOCK = threading.Lock()


@dataclass
class Prediction:
    """Scores are ``round(softmax * 255)`` (uint8, N×C×H×W); labels the argmax (uint8, N×H×W);
    confidence ``round(p * 255)`` of the label's probability (uint8, N×H×W, see
    :mod:`wsi_espnet.confidence`)."""

    scores: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray | None = None


class Predictor:
    """A model card's network on one device, turning uint8 NHWC tiles into class maps."""

    def __init__(self, card: ModelCard, device: str = "auto", model: nn.Module | None = None) -> None:
        """``model`` (already built, e.g. the network being trained) replaces the card's weights;
        ``card`` then only supplies the input normalisation. That is how train-time validation
        and ``evaluate`` run through exactly the code that ``segment`` runs."""
        self.card = card
        self.device = resolve_device(device)
        if model is None:
            model = card.build_model().to(self.device)
            if self.device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
        self.model = model.to(self.device).eval()
        # A model is shared by a worker's threads; PyTorch modules in eval mode are
        # re-entrant, but cuDNN autotuning and autocast state are not worth racing on.
        self._lock = threading.Lock()

    @torch.inference_mode()
    def predict(
        self, tiles: np.ndarray, crop: int = 0, *, tissue_only: bool = False, tta: int = 1
    ) -> Prediction:
        """Run the network on ``tiles`` (uint8, N×H×W×3) and drop ``crop`` pixels on each side.

        Cropping before the softmax saves the work on the halo, which is discarded anyway.
        ``tissue_only`` makes the labels the best *tissue* class (the argmax over every channel
        but the background's, channel 0): ``segment`` uses it where the tissue detector has
        already decided a pixel is tissue, so that tissue versus glass is decided once, by the
        detector at analysis resolution, and the model only chooses the class. The confidence
        is then that class's probability among the tissue classes.

        ``tta`` > 1 averages the probabilities of that many dihedral views of the whole batch
        (:mod:`wsi_espnet.tta`), each transformed back before the crop.
        """
        batch = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device, non_blocking=True)
        x = self.card.normalisation.apply(batch)
        if tta == 1:
            logits = crop_halo(self._forward(x), crop).float()
            labels = (logits[:, 1:].argmax(1) + 1 if tissue_only else logits.argmax(1)).to(torch.uint8)
            probs = torch.softmax(logits, 1)
            choice = torch.softmax(logits[:, 1:], 1) if tissue_only else probs
        else:
            probs, choice = averaged_probabilities(self._forward, x, tta, crop, tissue_only)
            labels = (choice.argmax(1) + (1 if tissue_only else 0)).to(torch.uint8)
        confidence = confidence_u8(choice)  # before the in-place rounding of ``probs`` below
        scores = probs.mul_(255).round_().to(torch.uint8)
        return Prediction(scores.cpu().numpy(), labels.cpu().numpy(), confidence.cpu().numpy())

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a normalised (N, 3, H, W) batch, under the lock (and bf16 autocast on CUDA)."""
        cuda = self.device.type == "cuda"
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._lock, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda):
            return self.model(x)


def get_predictor(card: ModelCard, device: str = "auto") -> Predictor:
    """The process-wide predictor for ``card`` on ``device`` (built once, then reused)."""
    key = (card.weights_sha256 or str(card.path), str(resolve_device(device)))
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = Predictor(card, device)
        return _CACHE[key]
