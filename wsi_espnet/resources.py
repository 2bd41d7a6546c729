"""Packaged configuration (model cards, cluster profiles) and the one YAML reader for all of it.

From a source checkout (or an editable install) the configuration is the repository's
``configs/``; in an installed wheel, hatchling copies it to ``wsi_espnet/_configs`` (see
pyproject.toml). Cards, profiles and ``--config`` files are all read by :func:`load_yaml`, so a
broken file gives the same one-line error whichever it is, and named lookups of packaged files go
through :func:`find_named`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from wsi_espnet.errors import WsiEspnetError

_PACKAGE = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The directory holding ``models/`` and ``clusters/``."""
    installed = _PACKAGE / "_configs"
    return installed if installed.is_dir() else _PACKAGE.parent / "configs"


def packaged(kind: str) -> list[Path]:
    """The shipped YAML files of ``kind`` (``models`` or ``clusters``), sorted by name."""
    return sorted((config_dir() / kind).glob("*.yaml"))


def find_named(name_or_path: str | Path, kind: str, error: type[WsiEspnetError], what: str) -> Path:
    """A YAML path as given, or the packaged ``<kind>/<name>.yaml``; else ``error`` listing the names.

    A value that looks like a path (a ``Path``, a ``.yaml``/``.yml`` ending or a ``/``) must exist.
    """
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith((".yaml", ".yml")) or "/" in text:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise error(f"{what} file not found", path)
        return path
    path = config_dir() / kind / f"{text}.yaml"
    if not path.is_file():
        known = ", ".join(p.stem for p in packaged(kind)) or "none"
        raise error(f"unknown {what} {text!r} (known: {known}; or give a path to a .yaml file)")
    return path


def load_yaml(path: Path, error: type[WsiEspnetError], what: str, empty_ok: bool = False) -> dict[str, Any]:
    """``yaml.safe_load`` of a mapping; any problem is ``error`` naming the file and the line."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"cannot read: {exc.strerror}", path) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise error(f"invalid YAML{where}: {getattr(exc, 'problem', exc)}", path) from exc
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise error(f"must be {what}", path)
    return data
