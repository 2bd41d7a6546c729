"""A GeoJSON that follows inference: bands vectorised as their rows become final, same file."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import shapely
import zarr
from distributed import Client, Future, LocalCluster
from export_stores import blob_labels, write_store

from wsi_espnet.config import OutputSettings
from wsi_espnet.export import export_all
from wsi_espnet.export.bands import BandVectoriser, following
from wsi_espnet.export.isolated import PARENT_GONE, ExportProcess
from wsi_espnet.geojson_follow import final_rows, submit_following
from wsi_espnet.grid import TileGrid
from wsi_espnet.outputs import SlideOutput
from wsi_espnet.runstate import Failed, SlideJob, SlidePlan

SETTINGS = OutputSettings(formats=("geojson",), geojson_min_area_um2=50.0)


def _regions(vectoriser: BandVectoriser) -> list[tuple[int, int, float, bytes]]:
    return [(i, r.value, r.pixels, shapely.to_wkb(r.geometry())) for i, r in vectoriser]


def test_vectoriser_following_a_growing_map_reads_only_final_rows(tmp_path: Path) -> None:
    """The map starts empty and a band's rows are written only when the vectoriser waits for
    them: had it read a band before its rows were final, it would have seen glass there."""
    full = blob_labels((300, 260), seed=23)
    layout = {"mode": "w", "shape": full.shape, "chunks": (64, 64), "dtype": "u1"}
    growing = zarr.open_array(tmp_path / "growing.zarr", **layout)
    asked: list[int] = []

    def wait(rows: int) -> None:
        start = asked[-1] if asked else 0
        growing[start:rows] = full[start:rows]  # "inference" finishes these rows now
        asked.append(rows)

    with following(wait):
        followed = BandVectoriser([growing], 1.0, 30.0)
        found = _regions(followed)
    complete = zarr.open_array(tmp_path / "complete.zarr", **layout)
    complete[...] = full
    after = BandVectoriser([complete], 1.0, 30.0)
    assert found and found == _regions(after)
    assert asked == [64, 128, 192, 256, 300]  # every band waited for, in order
    assert followed.specks == after.specks and followed.nonzero == [int(np.count_nonzero(full))]


def test_final_rows_stop_at_the_first_row_still_to_be_written() -> None:
    pending = Counter({0: 0, 1: 0, 2: 1, 3: 2})
    assert final_rows(pending, 5, 64, 300) == 128
    assert final_rows(Counter(), 5, 64, 300) == 300  # nothing left: the whole map, not 5 x 64


def test_following_export_stops_without_a_file_when_its_parent_goes(tmp_path: Path) -> None:
    store = write_store(tmp_path, blob_labels((200, 200), seed=24), tile=64, n_levels=1)
    child = ExportProcess(store, "geojson", SETTINGS, follow=True)
    child.rows_final(64)
    assert child.process.stdin is not None
    child.process.stdin.close()  # the parent goes without saying "done"
    assert child.process.wait(timeout=120) == PARENT_GONE
    child.kill()
    assert not list(tmp_path.glob("*.geojson")) and not list(tmp_path.glob(".*.geojson.*"))


def _plan(store_dir: Path, shape: tuple[int, int]) -> SlidePlan:
    """The plan fields the following export reads: job, output folder and grid."""
    from dataclasses import fields

    values = {f.name: None for f in fields(SlidePlan)}
    values |= {
        "job": SlideJob(store_dir / "slide.svs"),
        "output": SlideOutput(store_dir, "slide"),
        "grid": TileGrid(shape, 64, 16),
    }
    return SlidePlan(**values)


def _result(value: object, seconds: float = 0.5) -> object:
    time.sleep(seconds)  # finishes after the export has started waiting
    return value


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=1, threads_per_worker=2) as cluster, Client(cluster) as dask_client:
        yield dask_client


def _submit_following(
    client: Client, tmp_path: Path, values: list[object], rows: list[list[int]], seconds: float = 0.5
) -> Future:
    """Submit the following export as ``segment`` does and hand it writers that return
    ``values`` after ``seconds`` (writing ``rows``); return its future."""
    plan = _plan(tmp_path, (200, 200))

    def submit(func, *args, priority=0):
        return client.submit(func, *args, priority=priority, pure=False)

    following = submit_following(submit, plan, SETTINGS)
    writers = [client.submit(_result, value, seconds, pure=False) for value in values]
    return following.hand_over(dict(zip(writers, [[_Owner(r)] for r in rows], strict=True)))


def _following(client: Client, tmp_path: Path, values: list[object], rows: list[list[int]]) -> object:
    return _submit_following(client, tmp_path, values, rows).result()


@dataclass(frozen=True)
class _Owner:
    """What ``hand_over`` reads of a block: the chunks it owns, here one per row."""

    rows: list[int]

    @property
    def owned(self) -> list[tuple[int, int]]:
        return [(row, 0) for row in self.rows]


def test_following_export_in_a_worker_writes_the_file_of_an_export_after(tmp_path: Path, client) -> None:
    """Run as a Dask task that leaves the thread pool, told row by row by real futures."""
    store = write_store(tmp_path, blob_labels((200, 200), seed=25), tile=64, n_levels=1)
    stage = _following(client, tmp_path, [f"rows {i}" for i in range(4)], [[0], [1], [2], [3]])
    assert stage.name == "geojson" and stage.cpu_s > 0 and stage.ended >= stage.started
    followed = (tmp_path / "slide.geojson").read_bytes()
    export_all(store, settings=SETTINGS)
    assert followed == (tmp_path / "slide.geojson").read_bytes()
    assert json.loads(followed)["features"]


def test_following_export_stops_at_a_failed_infer_task(tmp_path: Path, client) -> None:
    write_store(tmp_path, blob_labels((200, 200), seed=26), tile=64, n_levels=1)
    failed = Failed(SlideJob(tmp_path / "slide.svs"), f"{tmp_path / 'slide.svs'}: cannot read tile")
    assert _following(client, tmp_path, ["rows 0", failed], [[0], [1, 2, 3]]) == failed
    assert not list(tmp_path.glob("*.geojson"))


def test_following_export_survives_the_loss_of_its_worker(tmp_path: Path) -> None:
    """A worker lost mid-run (killed, out of memory, pre-empted) reruns the task on its
    replacement: the rerun finds the infer futures again (they were handed over in Dask
    variables, which a read does not consume) and writes the whole file."""
    store = write_store(tmp_path, blob_labels((200, 200), seed=27), tile=64, n_levels=1)
    with LocalCluster(n_workers=1, threads_per_worker=2) as cluster, Client(cluster) as dask_client:
        future = _submit_following(dask_client, tmp_path, ["rows 0", "rows 1"], [[0, 1], [2, 3]], seconds=4.0)
        time.sleep(2.0)  # the export is running and waiting for its writers
        with contextlib.suppress(Exception):  # the connection to the killed worker breaks
            dask_client.run(os._exit, 1)
        stage = future.result(timeout=240)
    assert stage.name == "geojson" and stage.cpu_s > 0
    followed = (tmp_path / "slide.geojson").read_bytes()
    export_all(store, settings=SETTINGS)
    assert followed == (tmp_path / "slide.geojson").read_bytes()
