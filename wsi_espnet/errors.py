"""Typed, user-facing errors.

Every mistake a user can make (a missing file, a slide without resolution, a model card whose
weights do not match their hash) is raised as a :class:`WsiEspnetError`. The CLI prints its
message on one line and exits non-zero without a traceback; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

from pathlib import Path


class WsiEspnetError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)


class SlideError(WsiEspnetError):
    """The slide cannot be opened or read, or lacks what the pipeline needs (e.g. its mpp)."""


class ModelCardError(WsiEspnetError):
    """A model card is unknown, malformed, or its weights are missing or do not match."""


class ConfigError(WsiEspnetError):
    """A configuration file or option value is invalid."""


class OutputError(WsiEspnetError):
    """An output folder or store cannot be written or is not a wsi-espnet output."""


class AnnotationError(WsiEspnetError):
    """A QuPath GeoJSON annotation file cannot be used for training or evaluation."""


class ClusterError(WsiEspnetError):
    """The cluster could not be started or reached (no scheduler, no worker arrived)."""
