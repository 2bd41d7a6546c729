"""Where the packaged configuration lives (model cards, cluster profiles, defaults).

From a source checkout (or an editable install) that is the repository's ``configs/``; in an
installed wheel, hatchling copies it to ``wsi_espnet/_configs`` (see pyproject.toml). One helper
keeps every reader of configuration agnostic of how the package was installed.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The directory holding ``models/`` and ``clusters/``."""
    installed = _PACKAGE / "_configs"
    return installed if installed.is_dir() else _PACKAGE.parent / "configs"
