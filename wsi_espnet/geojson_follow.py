"""The level-0 GeoJSON of ``segment``, vectorised while the slide's last blocks still infer.

The GeoJSON is the longest export (about 27 CPU seconds on the 40x benchmark slide, most of it
vectorising bands of chunk rows), and it used to start only after the last block. Its band
loop needs no more than its bands to be final, and the rows above the lowest unfinished block
are: so the export starts with the slide's infer tasks, in a child process of its own
(:class:`~wsi_espnet.export.isolated.ExportProcess`), and is told, each time an infer task
ends, how many rows from the top are now written for good (no infer task still to write a chunk
in them). It works through them on whatever CPU inference leaves idle; after the last block
only the bands below the last unfinished row, and the assembling of the file, remain.

The task waits on other tasks for most of its life, so it leaves the worker's thread pool
(``distributed.secede``) and takes no slot from the infer tasks. An infer task that
fails stops the export (nothing is written) and its :class:`Failed` is the stage's outcome.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distributed import Variable, as_completed, secede

from wsi_espnet.blocks import Block, owned_chunks
from wsi_espnet.config import OutputSettings
from wsi_espnet.errors import WsiEspnetError
from wsi_espnet.export.isolated import ExportProcess
from wsi_espnet.runstate import Failed, SlidePlan, Stage

GEOJSON = "geojson"


@dataclass(frozen=True)
class Following:
    """A following GeoJSON, submitted before its slide's infer tasks and then handed them."""

    name: str  # of the Dask variables that hand them over
    future: Any
    client: Any  # the run's (None: the default client)

    def hand_over(self, writes: dict[Any, list[Block]]) -> Any:
        """Give the export the infer futures (``writes``: future -> blocks); return its future."""
        for index, future in enumerate(writes):
            Variable(f"{self.name}-{index}", client=self.client).set(future)
        rows = [sorted({row for row, _ in owned_chunks(blocks)}) for blocks in writes.values()]
        Variable(f"{self.name}-rows", client=self.client).set(rows)  # last: the task reads it first
        return self.future


def submit_following(submit: Callable[..., Any], plan_future: Any, settings: OutputSettings) -> Following:
    """Submit the following GeoJSON; hand it the slide's infer tasks with :meth:`Following.hand_over`.

    Submitted first, it gets a thread before the infer tasks take them all (and gives it back
    at once); an infer task of many blocks would otherwise hold its thread for half a minute.
    The infer futures travel in Dask variables: futures passed as task arguments would be
    waited for before the task starts, and a future made from a key inside a task is never
    told that it finished (the scheduler informs only the clients it knows want the key; a
    variable's ``get`` makes it so). Unlike a queue's items, a variable's value can be read
    again: a task rerun on another worker (its first worker lost) finds the futures still there.
    """
    name = f"wsi-espnet-geojson-{uuid.uuid4().hex}"
    future = submit(run_geojson_following, plan_future, settings, name, priority=1)
    return Following(name, future, getattr(plan_future, "client", None))


def final_rows(pending: Counter[int], rows: int, tile: int, height: int) -> int:
    """Label rows from the top that are final: those above the first of ``rows`` chunk rows
    that an infer task still has to write (``pending``: row -> writers left)."""
    first = next((row for row in range(rows) if pending[row] > 0), rows)
    return min(first * tile, height)


def run_geojson_following(plan: SlidePlan, settings: OutputSettings, name: str) -> Stage | Failed:
    """Write the slide's level-0 GeoJSON while its infer tasks run (the variables ``name``-rows:
    the chunk rows each writes; ``name``-0, -1, ...: their futures).

    The stage's ``started`` is when the last of them ended (so ``ended - started`` is what the
    export added after inference), ``cpu_s`` the export process tree's CPU seconds.
    """
    secede()
    child = ExportProcess(plan.output.root, GEOJSON, settings, follow=True)  # imports while blocks infer
    futures: dict[Any, list[int]] = {}
    try:
        rows: list[list[int]] = Variable(f"{name}-rows").get()
        futures = {Variable(f"{name}-{index}").get(): written for index, written in enumerate(rows)}
        pending = Counter(row for written in rows for row in written)
        n_rows = plan.grid.grid_shape[0]
        for future in as_completed(futures) if futures else ():
            value = future.result()  # an infer task that raised (after its retries) raises here
            if isinstance(value, Failed):
                _release(name, len(rows))
                return value
            pending.subtract(futures[future])
            child.rows_final(final_rows(pending, n_rows, plan.grid.tile, plan.grid.shape[0]))
        inferred = time.time()
        cpu_s = child.finish()
        _release(name, len(rows))
    except WsiEspnetError as exc:  # from the export: a user problem, not worth a rerun
        _release(name, len(futures))
        return Failed(plan.job, str(exc))
    finally:
        child.kill()
    return Stage(GEOJSON, inferred, time.time(), cpu_s=cpu_s)


def _release(name: str, writers: int) -> None:
    """Delete the hand-over variables, once no rerun can need them (after an outcome)."""
    for suffix in ("rows", *range(writers)):
        Variable(f"{name}-{suffix}").delete()
