"""Interrupted runs: kill -9 of the whole command, and a worker process dying mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
import yaml

from wsi_espnet.config import load_settings
from wsi_espnet.pipeline import run_segment
from wsi_espnet.runstate import SlideJob
from wsi_espnet.store import SlideStore

# 128-px chunks in blocks of at most 2x2, about two chunks per task: 48 chunks in many recorded
# blocks, so there is time to interrupt (each block is recorded once all its chunks are written).
RUN = {
    "tile": 128,
    "halo": 64,
    "block": 256,
    "chunks_per_task": 2,
    "batch_size": 2,
    "formats": [],
    "quiet": True,
}


def _labels(outdir):
    return SlideStore.open(outdir / "small" / "small.ome.zarr").labels(0)[:]


@pytest.fixture(scope="module")
def reference_labels(small_slide, tissue_card, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("reference")
    settings = load_settings(None, model=str(tissue_card), workers=0, **RUN)
    assert run_segment([SlideJob(small_slide)], outdir, settings)[0].status == "done"
    return _labels(outdir)


def _wait_for_batches(progress, n, proc=None, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if progress.is_dir() and len(list(progress.glob("batch-*.json"))) >= n:
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"run ended before it could be interrupted: {proc.stderr.read()}")
        time.sleep(0.05)
    pytest.fail("no progress recorded in time")


def test_kill_9_then_rerun_resumes_to_identical_labels(small_slide, tissue_card, tmp_path, reference_labels):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": str(tissue_card), "workers": 0, **RUN}))
    outdir = tmp_path / "out"
    command = [sys.executable, "-m", "wsi_espnet", "segment", str(small_slide), "-o", str(outdir)]
    proc = subprocess.Popen(
        [*command, "--config", str(config)], stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _wait_for_batches(outdir / "small" / ".progress", 6, proc)  # each holds >= 1 chunk
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    run = json.loads((outdir / "small" / "run.json").read_text())
    assert run["status"] != "complete"
    assert SlideStore.open(outdir / "small" / "small.ome.zarr").status == "running"

    rerun = subprocess.run([*command, "--config", str(config)], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    run = json.loads((outdir / "small" / "run.json").read_text())
    assert run["status"] == "complete" and run["resumed"] is True
    assert run["tiles"]["resumed_from_previous_run"] >= 6
    assert run["tiles"]["processed"] + run["tiles"]["resumed_from_previous_run"] == run["tiles"]["tissue"]
    np.testing.assert_array_equal(_labels(outdir), reference_labels)


def test_lost_worker_mid_run_still_gives_identical_result(
    small_slide, tissue_card, tmp_path, reference_labels
):
    settings = load_settings(None, model=str(tissue_card), workers=2, threads=1, **RUN)
    outdir = tmp_path / "out"
    results = []
    runner = threading.Thread(
        target=lambda: results.extend(run_segment([SlideJob(small_slide)], outdir, settings))
    )
    runner.start()
    _wait_for_batches(outdir / "small" / ".progress", 2)
    workers = [
        p
        for p in psutil.Process().children(recursive=True)
        if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())
    ]
    assert len(workers) == 2, [p.cmdline() for p in workers]
    workers[0].kill()  # the nanny restarts it; its tasks are rescheduled
    runner.join(timeout=600)
    assert results and results[0].status == "done", results
    np.testing.assert_array_equal(_labels(outdir), reference_labels)
