"""The OME-Zarr store: NGFF metadata validated by ome-zarr-models, read back by ome-zarr,
pyramids checked against numpy/scipy, concurrent writers from real processes, resume log."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from scipy import stats as scipy_stats

from wsi_espnet.errors import OutputError
from wsi_espnet.grid import TileGrid
from wsi_espnet.ngff import pyramid_shapes
from wsi_espnet.outputs import ProgressLog
from wsi_espnet.store import SlideStore

CLASSES = [
    {"value": 0, "name": "background", "color": [255, 255, 255]},
    {"value": 1, "name": "epithelium", "color": [0, 160, 0]},
    {"value": 2, "name": "stroma", "color": [245, 190, 110]},
]
ATTRS = {"model": {"name": "demo", "sha256": "ab" * 32}, "slide": {"vendor": "synthetic"}}
SHAPE = (1100, 700)  # 3 levels: 1100 -> 550 -> 275; odd edges on levels 1 and 2
TILE = 256
GRID = TileGrid(SHAPE, TILE, 0)
MPP = 2.0


def _chunk(store: SlideStore, iy: int, ix: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    h = min(TILE, store.shape[0] - iy * TILE)
    w = min(TILE, store.shape[1] - ix * TILE)
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 256, (len(CLASSES), h, w), dtype=np.uint8)
    return scores, scores.argmax(axis=0).astype(np.uint8)


def _filled(tmp_path: Path, zarr_format: int) -> SlideStore:
    store = SlideStore.create(
        tmp_path / "slide.ome.zarr",
        TileGrid(SHAPE, TILE, 16),
        MPP,
        CLASSES,
        zarr_format=zarr_format,
        attrs=ATTRS,
    )
    for iy in range(-(-SHAPE[0] // TILE)):
        for ix in range(-(-SHAPE[1] // TILE)):
            store.write_chunk((iy, ix), *_chunk(store, iy, ix, seed=iy * 10 + ix))
    store.build_pyramid()
    return store


@pytest.fixture(scope="module", params=[2, 3], ids=["zarr2-ngff04", "zarr3-ngff05"])
def filled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SlideStore:
    return _filled(tmp_path_factory.mktemp(f"fmt{request.param}"), request.param)


def test_pyramid_shapes_stop_near_512() -> None:
    assert pyramid_shapes((1100, 700)) == [(1100, 700), (550, 350), (275, 175)]
    assert pyramid_shapes((512, 300)) == [(512, 300)]
    assert pyramid_shapes((513, 10)) == [(513, 10), (257, 5)]


def test_metadata_validates_with_ome_zarr_models(filled: SlideStore) -> None:
    group = zarr.open_group(str(filled.path), mode="r")
    if filled.zarr_format == 2:
        from ome_zarr_models.v04 import Image, ImageLabel
    else:
        from ome_zarr_models.v05 import Image, ImageLabel
    image = Image.from_zarr(group)
    label = ImageLabel.from_zarr(group["labels/tissue"])
    assert len(image.datasets[0]) == filled.n_levels == 3
    attrs = label.ome_attributes
    image_label = attrs.image_label
    assert [c.label_value for c in image_label.colors] == [0, 1, 2]
    assert list(image_label.colors[2].rgba) == [0xF5, 0xBE, 0x6E, 255]
    assert [p.name for p in image_label.properties] == ["background", "epithelium", "stroma"]
    assert image_label.source.image == "../../"


def test_format_specific_layout(filled: SlideStore) -> None:
    scores, labels = filled.scores(0), filled.labels(0)
    assert scores.dtype == labels.dtype == np.uint8
    if filled.zarr_format == 2:
        assert scores.chunks == (3, TILE, TILE) and labels.chunks == (TILE, TILE)
        assert (filled.path / "labels/tissue/0/0/0").is_file()  # "/" chunk keys, as NGFF 0.4 needs
        assert "multiscales" in json.loads((filled.path / ".zattrs").read_text())
    else:
        assert scores.shards == (3, TILE, TILE) and labels.shards == (TILE, TILE)
        assert labels.chunks == (TILE // 2, TILE // 2)
        assert labels.metadata.dimension_names == ("y", "x")
        root = json.loads((filled.path / "zarr.json").read_text())["attributes"]
        assert root["ome"]["version"] == "0.5" and "multiscales" in root["ome"]


def test_ome_zarr_reads_scales_in_micrometres(filled: SlideStore) -> None:
    # Absolute path: ome-zarr 0.18 does not normalise "../../" on relative NGFF 0.5 paths.
    nodes = list(Reader(parse_url(str(filled.path.resolve())))())
    by_name = {Path(str(n.zarr).split(" ")[0]).name: n for n in nodes}
    image, label = by_name["slide.ome.zarr"], by_name["tissue"]
    for level in range(3):
        step = MPP * 2**level
        assert image.metadata["coordinateTransformations"][level] == [
            {"type": "scale", "scale": [1.0, step, step]}
        ]
        assert label.metadata["coordinateTransformations"][level] == [
            {"type": "scale", "scale": [step, step]}
        ]
    assert [a["unit"] for a in image.metadata["axes"][1:]] == ["micrometer", "micrometer"]
    assert image.metadata["name"] == "scores"
    np.testing.assert_array_equal(np.asarray(label.data[0]), filled.labels(0)[:])
    assert [d.shape for d in image.data] == [(3, 1100, 700), (3, 550, 350), (3, 275, 175)]
    assert image.metadata["channel_names"] == ["background", "epithelium", "stroma"]


def _reference_mode(labels: np.ndarray) -> np.ndarray:
    """scipy's mode of each 2x2 block (ties -> smallest), odd edges padded by repetition."""
    even = np.pad(labels, [(0, labels.shape[0] % 2), (0, labels.shape[1] % 2)], mode="edge")
    h, w = even.shape[0] // 2, even.shape[1] // 2
    blocks = even.reshape(h, 2, w, 2).transpose(0, 2, 1, 3).reshape(h, w, 4)
    return scipy_stats.mode(blocks, axis=2).mode.astype(np.uint8)


def _reference_mean(scores: np.ndarray) -> np.ndarray:
    pad = [(0, 0), (0, scores.shape[1] % 2), (0, scores.shape[2] % 2)]
    even = np.pad(scores, pad, mode="edge").astype(np.float64)
    c, h, w = even.shape[0], even.shape[1] // 2, even.shape[2] // 2
    mean = even.reshape(c, h, 2, w, 2).mean(axis=(2, 4))
    return np.floor(mean + 0.5).astype(np.uint8)


def test_pyramid_is_mode_and_mean_of_the_level_above(filled: SlideStore) -> None:
    for level in (1, 2):
        np.testing.assert_array_equal(filled.labels(level)[:], _reference_mode(filled.labels(level - 1)[:]))
        np.testing.assert_array_equal(filled.scores(level)[:], _reference_mean(filled.scores(level - 1)[:]))


def test_attributes_block_and_status(filled: SlideStore) -> None:
    reopened = SlideStore.open(filled.path)
    block = reopened.attrs
    assert block == {
        "model": {"name": "demo", "sha256": "ab" * 32},
        "classes": [
            {"value": 0, "name": "background", "color": [255, 255, 255]},
            {"value": 1, "name": "epithelium", "color": [0, 160, 0]},
            {"value": 2, "name": "stroma", "color": [245, 190, 110]},
        ],
        "mpp": MPP,
        "tile": TILE,
        "halo": 16,
        "slide": {"vendor": "synthetic"},
        "status": "running",
    }
    reopened.set_status("complete")
    assert SlideStore.open(filled.path).status == "complete"
    reopened.set_status("running")
    with pytest.raises(ValueError, match="status"):
        reopened.set_status("done")


def test_unwritten_chunks_read_as_background(tmp_path: Path) -> None:
    store = SlideStore.create(tmp_path / "s.ome.zarr", TileGrid((600, 600), TILE, 0), MPP, CLASSES)
    scores, labels = _chunk(store, 2, 2, seed=1)  # 88 x 88 bottom-right edge chunk
    store.write_chunk((2, 2), scores, labels)
    np.testing.assert_array_equal(store.labels(0)[512:, 512:], labels)
    assert not store.labels(0)[:512, :].any()
    assert not (tmp_path / "s.ome.zarr/labels/tissue/0/0/0").exists()
    with pytest.raises(ValueError, match="needs scores"):
        store.write_chunk((0, 0), scores, labels)


def test_open_rejects_what_is_not_our_store(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"missing\.ome\.zarr"):
        SlideStore.open(tmp_path / "missing.ome.zarr")
    zarr.create_group(str(tmp_path / "other.zarr"), attributes={"multiscales": []})
    with pytest.raises(OutputError, match=r"other\.zarr.*not a wsi-espnet store"):
        SlideStore.open(tmp_path / "other.zarr")
    SlideStore.create(tmp_path / "s.ome.zarr", GRID, MPP, CLASSES)
    with pytest.raises(OutputError, match="already exists"):
        SlideStore.create(tmp_path / "s.ome.zarr", GRID, MPP, CLASSES)


def _write_one(store: SlideStore, index: tuple[int, int]) -> int:
    store.write_chunk(index, *_chunk(store, *index, seed=index[0] * 10 + index[1]))
    return os.getpid()


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_concurrent_writers_in_separate_processes(tmp_path: Path, zarr_format: int) -> None:
    from distributed import Client, LocalCluster

    store = SlideStore.create(tmp_path / "s.ome.zarr", GRID, MPP, CLASSES, zarr_format=zarr_format)
    indices = [(iy, ix) for iy in range(5) for ix in range(3)]
    with (
        LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        pids = client.gather(client.map(_write_one, [store] * len(indices), indices, pure=False))
        store.build_pyramid(client=client)
    assert len(set(pids)) == 2 and os.getpid() not in pids
    reference = _filled(tmp_path / "serial", zarr_format)
    for level in range(3):
        np.testing.assert_array_equal(store.labels(level)[:], reference.labels(level)[:])
        np.testing.assert_array_equal(store.scores(level)[:], reference.scores(level)[:])


def test_progress_log_records_atomically(tmp_path: Path) -> None:
    log = ProgressLog(tmp_path / ".progress")
    assert log.done() == set()
    log.record("0001", [(0, 0), (0, 1)])
    log.record("0002", [(3, 4)])
    # A writer killed mid-record leaves only its temporary file, which never counts.
    (tmp_path / ".progress" / ".batch-0003.json.deadbeef.tmp").write_text("[[9, ")
    assert log.done() == {(0, 0), (0, 1), (3, 4)}
    log.record("0002", [(3, 4), (5, 5)])  # a retried batch replaces its record
    assert ProgressLog(tmp_path / ".progress").done() == {(0, 0), (0, 1), (3, 4), (5, 5)}
    assert not [p for p in (tmp_path / ".progress").iterdir() if p.name.startswith(".") and "0002" in p.name]


@pytest.mark.parametrize("zarr_format", [2, 3], ids=["ngff04", "ngff05"])
def test_ngff_metadata_validates_with_ome_zarr_models(tmp_path: Path, zarr_format: int) -> None:
    """The image, the labels group and the image-label, as ome-zarr-models reads them."""
    import importlib

    models = importlib.import_module("ome_zarr_models.v04" if zarr_format == 2 else "ome_zarr_models.v05")
    store = SlideStore.create(tmp_path / "s.ome.zarr", GRID, MPP, CLASSES, zarr_format=zarr_format)
    group = zarr.open_group(store.path, mode="r")
    image = models.Image.from_zarr(group)
    label = models.ImageLabel.from_zarr(group["labels/tissue"])
    attributes = image.attributes if zarr_format == 2 else image.attributes.ome  # 0.5 nests under "ome"
    scales = [d.coordinateTransformations[0].scale for d in attributes.multiscales[0].datasets]
    assert scales == [[1.0, MPP * 2**n, MPP * 2**n] for n in range(store.n_levels)]
    assert label is not None
