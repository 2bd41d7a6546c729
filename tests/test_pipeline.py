"""End to end: real slides → real LocalCluster → real OME-Zarr stores, statistics and exports."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import zarr

from wsi_espnet.config import load_settings
from wsi_espnet.pipeline import run_segment
from wsi_espnet.runstate import SlideJob
from wsi_espnet.store import SlideStore


def _settings(card, **overrides):
    base = {"model": str(card), "tile": 256, "halo": 64, "quiet": True, "workers": 1, "threads": 2}
    return load_settings(None, **(base | overrides))


@pytest.fixture(scope="module")
def sample_run(small_slide, tissue_card, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("run")
    results = run_segment([SlideJob(small_slide)], outdir, _settings(tissue_card))
    return outdir, results


def test_sample_slide_produces_every_output(sample_run):
    outdir, results = sample_run
    assert [r.status for r in results] == ["done"], results
    folder = outdir / "small"
    for name in [
        "small.ome.zarr",
        "small.stats.json",
        "small.stats.csv",
        "small.geojson",
        "small.labels.ome.tif",
        "small.overlay.png",
        "small.report.html",
        "run.json",
    ]:
        assert (folder / name).exists(), name
    run = json.loads((folder / "run.json").read_text())
    assert run["status"] == "complete"
    assert run["tiles"]["total"] == 12  # 1024x768 at 1 µm/px in 256-px chunks
    assert run["tiles"]["processed"] + run["tiles"]["skipped_background"] == 12
    assert run["versions"]["torch"].startswith("2.")
    assert run["parameters"]["tile"] == 256
    stages = {"prepare_s", "read_s", "inference_s", "write_s", "pyramid_s", "statistics_s", "exports_s"}
    stages |= {"exports_wall_s", "finalise_wall_s"}
    assert set(run["timings"]) >= stages
    assert set(run["timings"]["exports_s"]) == {"geojson", "ometiff", "png", "html"}
    blocks = run["inference"]
    assert blocks["block_chunks"] >= 1 and blocks["blocks"] >= 1
    assert blocks["amplification"] >= blocks["halo_union_floor"] > 1
    report = (folder / "small.report.html").read_text()
    assert "complete" in report and "exporting" not in report  # written after the final status
    with open(outdir / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["status"] == "done" and float(rows[0]["tissue_area_mm2"]) > 0


def test_store_is_valid_ome_ngff_and_complete(sample_run):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v04 import Image

    outdir, _ = sample_run
    path = outdir / "small" / "small.ome.zarr"
    Image.from_zarr(zarr.open_group(path, mode="r"))
    nodes = list(Reader(parse_url(str(path)))())
    assert nodes and nodes[0].data[0].shape == (8, 768, 1024)
    store = SlideStore.open(path)
    assert store.status == "complete"
    assert store.attrs["model"]["name"]
    assert store.labels(0).chunks == (256, 256)


def test_statistics_agree_with_the_label_array(sample_run):
    outdir, _ = sample_run
    stats = json.loads((outdir / "small" / "small.stats.json").read_text())
    labels = SlideStore.open(outdir / "small" / "small.ome.zarr").labels(0)[:]
    mpp = stats["mpp"]
    tissue_pixels = 0
    for row in stats["classes"]:
        if row["label"] == 0:
            continue
        assert row["pixels"] == int((labels == row["label"]).sum())
        assert row["area_mm2"] == pytest.approx(row["pixels"] * mpp * mpp / 1e6)
        tissue_pixels += row["pixels"]
    assert stats["tissue_area_mm2"] == pytest.approx(tissue_pixels * mpp * mpp / 1e6)


def test_pyramid_built_as_blocks_finish_equals_one_built_after(small_slide, tissue_card, tmp_path):
    """One-chunk blocks in one-block tasks give parents of several writers; the
    pyramid written task by task as they finish is the one built from level 0 afterwards."""
    from wsi_espnet.outputs import ProgressLog, SlideOutput

    settings = _settings(tissue_card, block=256, chunks_per_task=1, formats="")
    results = run_segment([SlideJob(small_slide)], tmp_path, settings)
    assert [r.status for r in results] == ["done"], results
    output = SlideOutput.for_slide(tmp_path, small_slide)
    store = SlideStore.open(output.store)
    assert store.n_levels >= 2
    layers = store.pyramid_layers()
    progressive = [[np.asarray(level[...]) for level in layer.levels[1:]] for layer in layers]
    written = ProgressLog(output.progress_dir).done()
    assert len(written) > 4  # several writers
    store.build_pyramid(written)
    for layer, levels in zip(store.pyramid_layers(), progressive, strict=True):
        for level, before in zip(layer.levels[1:], levels, strict=True):
            assert np.array_equal(np.asarray(level[...]), before)
    run = json.loads(output.run_json.read_text())
    assert 0 < run["timings"]["finalise_wall_s"] < run["timings"]["pyramid_s"] + 60


def test_completed_slide_is_skipped_on_rerun(sample_run, small_slide, tissue_card):
    outdir, _ = sample_run
    results = run_segment([SlideJob(small_slide)], outdir, _settings(tissue_card))
    assert results[0].status == "skipped"


def test_labels_are_background_outside_tissue(sample_run):
    outdir, _ = sample_run
    labels = SlideStore.open(outdir / "small" / "small.ome.zarr").labels(0)[:]
    # The synthetic slide's border is glass: nothing there may be labelled as tissue.
    assert not labels[:8, :].any() and not labels[:, :8].any()


def test_one_corrupt_slide_does_not_sink_the_batch(small_slide, tissue_card, tmp_path):
    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_bytes(small_slide.read_bytes()[:5000])
    text = tmp_path / "notes.tif"
    text.write_text("not a slide")
    results = run_segment(
        [SlideJob(corrupt), SlideJob(small_slide), SlideJob(text)],
        tmp_path / "out",
        _settings(tissue_card, formats=(), performance_report=tmp_path / "dask-report.html"),
    )
    assert "Dask Performance Report" in (tmp_path / "dask-report.html").read_text()
    status = {r.slide.name: r for r in results}
    assert status["small.tif"].status == "done"
    assert status["corrupt.svs"].status == "failed" and "corrupt.svs" in status["corrupt.svs"].error
    assert status["notes.tif"].status == "failed" and "notes.tif" in status["notes.tif"].error
    assert not (tmp_path / "out" / "corrupt" / "run.json").exists()


def test_slide_smaller_than_one_tile(tissue_card, tmp_path):
    from wsi_espnet.sample import write_sample_slide

    slide = write_sample_slide(tmp_path / "tiny.tif", 300, 200, mpp=0.5, tissue_fraction=0.5, seed=1)
    results = run_segment([SlideJob(slide)], tmp_path / "out", _settings(tissue_card, workers=0))
    assert results[0].status == "done", results[0].error
    store = SlideStore.open(tmp_path / "out" / "tiny" / "tiny.ome.zarr")
    assert store.labels(0).shape == (100, 150)


def test_zarr_format_3_writes_ngff_05(small_slide, tissue_card, tmp_path):
    from ome_zarr_models.v05 import Image

    results = run_segment(
        [SlideJob(small_slide)],
        tmp_path,
        _settings(tissue_card, zarr_format=3, formats=("geojson",), workers=0),
    )
    assert results[0].status == "done", results[0].error
    group = zarr.open_group(tmp_path / "small" / "small.ome.zarr", mode="r")
    assert group.metadata.zarr_format == 3
    Image.from_zarr(group)


def test_no_tissue_slide_finishes_with_zero_area(tissue_card, tmp_path):
    import tifffile

    blank = tmp_path / "blank.tif"
    tifffile.imwrite(
        blank,
        np.full((512, 512, 3), 255, np.uint8),
        tile=(256, 256),
        photometric="rgb",
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
    )
    results = run_segment([SlideJob(blank)], tmp_path / "out", _settings(tissue_card, workers=0))
    assert results[0].status == "done", results[0].error
    assert results[0].tissue_area_mm2 == 0
    geo = json.loads((tmp_path / "out" / "blank" / "blank.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and geo["features"] == []


def test_tasks_return_user_problems_as_values(small_slide, tissue_card, tmp_path):
    """A slide that disappears (or turns unreadable) after prepare fails its infer task as a
    value naming the file once, not as an exception that Dask would retry."""
    import shutil

    from wsi_espnet.finalise import (
        run_complete,
        run_pyramid_done,
        run_pyramid_units,
        run_statistics,
        run_statistics_partials,
    )
    from wsi_espnet.infer import infer_task
    from wsi_espnet.prepare import prepare_slide
    from wsi_espnet.runstate import Failed, SlidePlan

    slide = shutil.copy(small_slide, tmp_path / "moved.tif")
    settings = _settings(tissue_card, workers=0)
    plan = prepare_slide(SlideJob(slide), tmp_path / "out", settings)
    assert isinstance(plan, SlidePlan) and plan.blocks
    (tmp_path / "moved.tif").unlink()
    failed = infer_task(plan, list(plan.blocks[:1]), settings.inference)
    assert isinstance(failed, Failed) and failed.error.count("moved.tif") == 1
    # finalise does not run
    assert run_statistics_partials(plan, settings.outputs, [(0, 0)], failed) == failed
    assert run_statistics(plan, settings.outputs, [failed], failed) == failed
    assert run_pyramid_units(plan, 1, [(0, 0)], failed) == failed
    assert run_pyramid_done(plan, failed) == failed
    assert run_complete(plan, settings.outputs, [failed, failed], failed) == failed
    assert json.loads((tmp_path / "out" / "moved" / "run.json").read_text())["status"] == "running"
