"""Test-time augmentation: average class probabilities over 1, 2, 4 or 8 dihedral views of a block.

A view transforms the whole inference block (the window with its halo) before the network, and
its output is transformed back before the halo is cropped, so every view's prediction of a pixel
sees the same context and the chunk seams stay where they were. The views come in a fixed order
whose prefixes are groups, so the average over ``n`` views is exactly invariant under the views
it contains (up to float summation order):

* 1: identity;
* 2: + horizontal flip (x reversed);
* 4: + vertical flip, + both flips (a 180° rotation);
* 8: + the transpose of each of the four (the other rotations and the diagonal mirrors).

Probabilities (softmax), not logits, are averaged: the mean of the views' probabilities is a
probability itself, so the scores, labels and confidence of a TTA run read exactly as those of a
plain run. H&E has no preferred orientation, which is why the training augmentation already
draws all eight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

TTA_CHOICES = (1, 2, 4, 8)
_H, _W = -2, -1


@dataclass(frozen=True)
class View:
    """Flip ``dims`` of an (N, C, H, W) tensor, then swap H and W when ``transpose``."""

    dims: tuple[int, ...]
    transpose: bool

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.flip(x, self.dims) if self.dims else x
        return y.transpose(_H, _W).contiguous() if self.transpose else y

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        """The inverse view: both steps are involutions, so undo them in the opposite order."""
        x = y.transpose(_H, _W) if self.transpose else y
        return torch.flip(x, self.dims) if self.dims else x


VIEWS = tuple(View(dims, transpose) for transpose in (False, True) for dims in ((), (_W,), (_H,), (_H, _W)))


def views(n: int) -> tuple[View, ...]:
    """The first ``n`` views (``n`` in :data:`TTA_CHOICES`)."""
    if n not in TTA_CHOICES:
        raise ValueError(f"tta must be one of {TTA_CHOICES}, not {n}")
    return VIEWS[:n]


def crop_halo(t: torch.Tensor, crop: int) -> torch.Tensor:
    """Drop ``crop`` pixels on each side of the last two axes."""
    return t[..., crop : t.shape[-2] - crop, crop : t.shape[-1] - crop] if crop else t


Forward = Callable[[torch.Tensor], torch.Tensor]


def averaged_probabilities(
    forward: Forward, x: torch.Tensor, n_views: int, crop: int, tissue_only: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probabilities, choice)`` averaged over the first ``n_views`` views of ``x``.

    ``forward`` maps the normalised (N, 3, H, W) input to logits. ``probabilities`` is the mean
    softmax over every class (the stored scores); ``choice`` is what the label and the
    confidence are taken from: the same tensor, or with ``tissue_only`` the mean softmax over
    the tissue channels only (channel 0, background, left out), both halo-cropped.
    """
    total: torch.Tensor | None = None
    total_tissue: torch.Tensor | None = None
    for view in views(n_views):
        logits = crop_halo(view.invert(forward(view.apply(x))).float(), crop)
        probs = torch.softmax(logits, 1)
        total = probs if total is None else total.add_(probs)
        if tissue_only:
            tissue = torch.softmax(logits[:, 1:], 1)
            total_tissue = tissue if total_tissue is None else total_tissue.add_(tissue)
    assert total is not None
    total.div_(n_views)
    return total, (total_tissue.div_(n_views) if total_tissue is not None else total)
