"""One export in a child process of its own, so that it does not share a Dask worker's GIL.

The finalise stages of a slide run as tasks of the same worker when it is the only one (the
default on a workstation: one worker, two threads). The GeoJSON vectoriser and the tile-by-tile
OME-TIFF writer hold the GIL for much of their work, so beside each other and the pyramid they
ran at half speed (40x benchmark slide: GeoJSON 45 s in the worker, 20 s in a process of its
own). A Dask worker is a daemonic process, which ``multiprocessing`` (and so
``ProcessPoolExecutor``) may not fork from; a plain child process via ``subprocess`` may run.

The request (store folder, format, :class:`~wsi_espnet.config.OutputSettings`) travels as JSON
on the child's stdin; nothing from an input file is executed. A user problem in the child
(:class:`~wsi_espnet.errors.WsiEspnetError`, exit status 1) comes back as an
:class:`~wsi_espnet.errors.OutputError` with the child's one-line message; anything else (a
bug) as a ``RuntimeError`` with the child's last line, which Dask may retry.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from wsi_espnet.config import OutputSettings
from wsi_espnet.errors import OutputError, WsiEspnetError

USER_PROBLEM = 1  # the child's exit status for a WsiEspnetError


def export_in_process(root: Path, fmt: str, settings: OutputSettings) -> None:
    """Write export ``fmt`` of the result folder ``root`` in a child Python process."""
    request = json.dumps({"root": str(root), "format": fmt, "settings": dataclasses.asdict(settings)})
    done = subprocess.run(
        [sys.executable, "-m", __name__], input=request, text=True, capture_output=True, check=False
    )
    if done.returncode == 0:
        return
    lines = done.stderr.strip().splitlines()
    last = lines[-1] if lines else f"exit status {done.returncode}"
    if done.returncode == USER_PROBLEM:
        raise OutputError(last)
    raise RuntimeError(f"the {fmt} export failed in its process: {last}")


def main() -> int:
    """The child: read the request from stdin, write the export, report a user problem on stderr."""
    from wsi_espnet.export import export_all  # the child's only heavy import
    from wsi_espnet.export.bands import allow_processes

    allow_processes()  # this module is __main__ here, and safe for spawned workers to import
    request = json.loads(sys.stdin.read())
    options = request["settings"]
    settings = OutputSettings(**{**options, "formats": tuple(options["formats"])})
    try:
        export_all(request["root"], (request["format"],), settings)
    except WsiEspnetError as exc:
        print(str(exc).splitlines()[0], file=sys.stderr)
        return USER_PROBLEM
    return 0


if __name__ == "__main__":
    sys.exit(main())
