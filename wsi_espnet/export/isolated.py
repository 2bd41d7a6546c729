"""One export in a child process of its own, so that it does not share a Dask worker's GIL.

The finalise stages of a slide run as tasks of the same worker when it is the only one (the
default on a workstation: one worker, two threads). The GeoJSON vectoriser and the tile-by-tile
OME-TIFF writer hold the GIL for much of their work, so beside each other and the pyramid they
ran at half speed (40x benchmark slide: GeoJSON 45 s in the worker, 20 s in a process of its
own). A Dask worker is a daemonic process, which ``multiprocessing`` (and so
``ProcessPoolExecutor``) may not fork from; a plain child process via ``subprocess`` may run.

The request (store folder, format, :class:`~wsi_espnet.config.OutputSettings`) travels as one
JSON line on the child's stdin; nothing from an input file is executed. A *following* export
(a GeoJSON of a map still being written, :func:`wsi_espnet.export.bands.following`) then reads
one line per advance: the number of label rows, from the top, that are final; ``done`` when all
are. Should the parent go before saying ``done``, the child stops without writing anything.
The child's last stdout line reports its CPU seconds (its band workers' included). A user
problem in the child (:class:`~wsi_espnet.errors.WsiEspnetError`, exit status 1) comes back as
an :class:`~wsi_espnet.errors.OutputError` with the child's one-line message; anything else (a
bug) as a ``RuntimeError`` with the child's last line, which Dask may retry.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

from wsi_espnet.config import OutputSettings
from wsi_espnet.errors import OutputError, WsiEspnetError

USER_PROBLEM = 1  # the child's exit status for a WsiEspnetError
PARENT_GONE = 2  # the child's exit status when its parent went before saying DONE
DONE = "done"  # the line that says every row is final
FOLLOW_NICENESS = 10  # a following export's scheduling priority below its parent's


class ExportProcess:
    """An export running in a child process; a following one is told as rows become final."""

    def __init__(self, root: Path, fmt: str, settings: OutputSettings, follow: bool = False) -> None:
        self.fmt = fmt
        settings_fields = dataclasses.asdict(settings)
        request = {"root": str(root), "format": fmt, "settings": settings_fields, "follow": follow}
        # stderr to a file that lives as long as the child: a pipe nobody reads while the
        # export runs could fill and stall it
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by finish/kill)
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        self._tell(json.dumps(request))

    def rows_final(self, rows: int) -> None:
        """Tell a following export that label rows ``0:rows`` are written for good."""
        self._tell(str(rows))

    def finish(self) -> float:
        """Say every row is final, wait for the export; return its CPU seconds, or raise its error."""
        self._tell(DONE)
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        report = self.process.stdout.read().strip().splitlines()
        returncode = self.process.wait()
        self.stderr.seek(0)
        lines = self.stderr.read().strip().splitlines()
        self.stderr.close()
        if returncode == 0:
            return float(json.loads(report[-1])["cpu_s"])
        last = lines[-1] if lines else f"exit status {returncode}"
        if returncode == USER_PROBLEM:
            raise OutputError(last)
        raise RuntimeError(f"the {self.fmt} export failed in its process: {last}")

    def kill(self) -> None:
        """Stop the export (its partial files are temporary ones, removed with it)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.stderr.close()

    def _tell(self, line: str) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:  # the child has stopped: finish() reports why
            pass


def export_in_process(root: Path, fmt: str, settings: OutputSettings) -> float:
    """Write export ``fmt`` of the result folder ``root`` in a child Python process; return its
    CPU seconds."""
    return ExportProcess(root, fmt, settings).finish()


class _RowsFromParent:
    """The child's side of a following export: block until the parent says rows are final."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream, self.rows = stream, 0

    def __call__(self, rows: int) -> None:
        while self.rows < rows:
            line = self.stream.readline().strip()
            if not line:
                print("the parent stopped before all rows were final; nothing written", file=sys.stderr)
                raise SystemExit(PARENT_GONE)
            self.rows = sys.maxsize if line == DONE else int(line)


def main() -> int:
    """The child: read the request from stdin, write the export, report a user problem on stderr."""
    from wsi_espnet.export import export_all  # the child's only heavy import
    from wsi_espnet.export.bands import allow_processes, following

    request = json.loads(sys.stdin.readline())
    if not request.get("follow"):  # beside inference, two more processes cost memory for idle cores
        allow_processes()  # this module is __main__ here, and safe for spawned workers to import
    options = request["settings"]
    settings = OutputSettings(**{**options, "formats": tuple(options["formats"])})
    try:
        if request.get("follow"):
            # Runs beside inference: yield the cores to it, so the bands take the CPU the network
            # leaves idle rather than slow its threads down.
            os.nice(FOLLOW_NICENESS)
            with following(_RowsFromParent(sys.stdin)):
                export_all(request["root"], (request["format"],), settings)
        else:
            export_all(request["root"], (request["format"],), settings)
    except WsiEspnetError as exc:
        print(str(exc).splitlines()[0], file=sys.stderr)
        return USER_PROBLEM
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    print(json.dumps({"cpu_s": sum(u.ru_utime + u.ru_stime for u in usage)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
