"""OME-TIFF export: pyramid levels, tiles, physical size, class names, values, flat memory."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import tifffile
from export_stores import CLASSES, blob_labels, write_store

from wsi_espnet.errors import OutputError
from wsi_espnet.export.ometiff import write_ome_tiff

OME = "{http://www.openmicroscopy.org/Schemas/OME/2016-06}"


def test_labels_pyramid_reads_back(tmp_path: Path) -> None:
    labels = blob_labels((700, 1100), seed=2)
    store = write_store(tmp_path, labels, mpp=2.0, n_levels=3, zarr_format=3)
    path, rgb_path = write_ome_tiff(store, tmp_path / "slide.labels.ome.tif")
    assert rgb_path.name == "slide.labels-rgb.ome.tif"

    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and len(tif.series) == 1
        levels = tif.series[0].levels
        assert [level.shape for level in levels] == [(700, 1100), (350, 550), (175, 275)]
        page = tif.pages[0]
        assert (page.tilewidth, page.tilelength) == (512, 512)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert len(page.subifds) == 2
        for index, level in enumerate(levels):
            step = 2**index
            np.testing.assert_array_equal(level.asarray(), labels[::step, ::step])
        assert page.get_resolution(tifffile.RESUNIT.MICROMETER) == pytest.approx((0.5, 0.5))
        for level_page in (page, *(tif.series[0].levels[i].keyframe for i in (1, 2))):
            assert level_page.photometric == tifffile.PHOTOMETRIC.PALETTE  # every level is indexed
            for c in CLASSES:  # the TIFF colour map holds the class colours (16-bit, as TIFF wants)
                assert level_page.colormap[:, c["value"]].tolist() == [v * 257 for v in c["color"]]
        ome = ET.fromstring(tif.ome_metadata)

    pixels = ome.find(f"{OME}Image/{OME}Pixels")
    assert float(pixels.get("PhysicalSizeX")) == 2.0 and pixels.get("PhysicalSizeXUnit") == "µm"
    assert float(pixels.get("PhysicalSizeY")) == 2.0 and pixels.get("PhysicalSizeYUnit") == "µm"
    description = ome.find(f"{OME}Image/{OME}Description").text
    assert "2=malignant_epithelium" in description
    pairs = {m.get("K"): m.text for m in ome.iter(f"{OME}M")}
    assert all(pairs[str(c["value"])] == c["name"] for c in CLASSES)
    assert pairs["model"] == "test-model"


def test_rgb_rendering_has_the_class_colours(tmp_path: Path) -> None:
    labels = blob_labels((300, 520), seed=6)
    store = write_store(tmp_path, labels, n_levels=2, tile=64)
    _, rgb_path = write_ome_tiff(store, tmp_path / "slide.labels.ome.tif")
    palette = np.zeros((256, 3), np.uint8)
    for c in CLASSES:
        palette[c["value"]] = c["color"]
    with tifffile.TiffFile(rgb_path) as tif:
        assert tif.is_ome and tif.pages[0].photometric == tifffile.PHOTOMETRIC.RGB
        levels = tif.series[0].levels
        assert [level.shape for level in levels] == [(300, 520, 3), (150, 260, 3)]
        for index, level in enumerate(levels):
            np.testing.assert_array_equal(level.asarray(), palette[labels[:: 2**index, :: 2**index]])
        assert 'PhysicalSizeX="2.0"' in tif.ome_metadata
    (only,) = write_ome_tiff(store, tmp_path / "plain.labels.ome.tif", rgb=False)
    assert only.name == "plain.labels.ome.tif"


def test_scores_go_to_a_separate_file_with_named_channels(tmp_path: Path) -> None:
    labels = blob_labels((300, 260), seed=4)
    store = write_store(tmp_path, labels, n_levels=2, tile=64)
    paths = write_ome_tiff(store, tmp_path / "slide.labels.ome.tif", include_scores=True)
    assert [p.name for p in paths] == [
        "slide.labels.ome.tif",
        "slide.labels-rgb.ome.tif",
        "slide.scores.ome.tif",
    ]
    with tifffile.TiffFile(paths[2]) as tif:
        levels = tif.series[0].levels
        assert [level.shape for level in levels] == [(5, 300, 260), (5, 150, 130)]
        scores = levels[1].asarray()
        names = [c.get("Name") for c in ET.fromstring(tif.ome_metadata).iter(f"{OME}Channel")]
    assert names == [c["name"] for c in CLASSES]
    np.testing.assert_array_equal(scores.argmax(axis=0), labels[::2, ::2])


_PEAK = """
import sys, tracemalloc
from pathlib import Path
import numpy as np
from export_stores import write_store
from wsi_espnet.export.ometiff import write_ome_tiff
directory, height = Path(sys.argv[1]), int(sys.argv[2])
labels = np.zeros((height, 2048), np.uint8)
labels[100 : height - 100, 200:1900] = 3
store = write_store(directory, labels, tile=512, n_levels=1, stats=False)
tracemalloc.start()
write_ome_tiff(store, directory / "big.ome.tif")
print(tracemalloc.get_traced_memory()[1])
"""


def _peak_bytes(directory: Path, height: int) -> int:
    """The writer's peak Python allocation, traced in a fresh process: threads that earlier tests
    left behind (zarr's event loop, Dask) would otherwise be traced too."""
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", _PEAK, str(directory), str(height)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=True)
    return int(done.stdout.split()[-1])


def test_memory_stays_flat(tmp_path: Path) -> None:
    (tmp_path / "short").mkdir()
    (tmp_path / "tall").mkdir()
    short = _peak_bytes(tmp_path / "short", 2048)  # 4 MiB map
    tall = _peak_bytes(tmp_path / "tall", 8192)  # 16 MiB map
    # peak memory is a band of tiles and codec buffers: it does not grow with the slide
    assert tall < 1.25 * short, (short, tall)
    assert tall < 2048 * 8192 / 2


def test_unwritable_path_is_a_user_error(tmp_path: Path) -> None:
    store = write_store(tmp_path, np.zeros((64, 64), np.uint8), tile=32, n_levels=1)
    with pytest.raises(OutputError, match="cannot write OME-TIFF"):
        write_ome_tiff(store, tmp_path / "missing" / "x.ome.tif")
