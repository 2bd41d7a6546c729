"""The benchmark harness runs end to end (``--smoke``: tiny slides) and reports every section.

No timing assertions: CI machines are noisy. The checks are that each section ran on real
generated slides and produced self-consistent numbers.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.gigapixel import core_px, halo_union_px, selected_chunks
from wsi_espnet.outputs import ProgressLog

ROOT = Path(__file__).resolve().parents[1]


def _raster_union(indices: list[tuple[int, int]], shape: tuple[int, int], tile: int, halo: int) -> int:
    """The same union counted pixel by pixel on a canvas with ``halo`` of margin."""
    canvas = np.zeros((shape[0] + 2 * halo, shape[1] + 2 * halo), bool)
    for iy, ix in indices:
        y1, x1 = min(iy * tile + tile, shape[0]), min(ix * tile + tile, shape[1])
        canvas[iy * tile : y1 + 2 * halo, ix * tile : x1 + 2 * halo] = True
    return int(canvas.sum())


def test_halo_union_counts_overlapping_windows_once() -> None:
    shape = (1000, 1300)  # partial chunks on the bottom and right edges at tile 256
    assert halo_union_px([(0, 0)], shape, 256, 64) == 384**2
    assert halo_union_px([(0, 0), (0, 1)], shape, 256, 64) == 384 * (512 + 128)
    assert halo_union_px([(3, 5)], shape, 256, 64) == (1000 - 768 + 128) * (1300 - 1280 + 128)
    assert halo_union_px([], shape, 256, 64) == 0
    rng = np.random.default_rng(0)
    cells = [(int(y), int(x)) for y, x in zip(*np.nonzero(rng.random((4, 6)) < 0.4), strict=True)]
    assert halo_union_px(cells, shape, 256, 64) == _raster_union(cells, shape, 256, 64)
    assert core_px(cells, shape, 256) == _raster_union(cells, shape, 256, 0)


def test_selected_chunks_read_back_from_progress_records(tmp_path: Path) -> None:
    log = ProgressLog(tmp_path / ".progress")
    log.record("0-0-2", [(0, 0), (0, 1)])
    log.record("2-3-1", [(2, 3)])
    assert selected_chunks(tmp_path) == [(0, 0), (0, 1), (2, 3)]


@pytest.mark.slow
def test_smoke_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--smoke",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "w"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    sections = {"efficiency", "seam", "peer", "scale", "tissue_skipping", "gigapixel"}
    assert {"machine", "profile", *sections} <= results.keys()
    assert results["machine"]["versions"]["torch"]

    eff = results["efficiency"]
    assert eff["tiles"] > 0 and eff["model_only_tiles_per_s"] > 0 and eff["ratio_pipeline"] > 0
    assert eff["halo_compute_amplification"] == pytest.approx((256 + 64) ** 2 / 256**2)
    assert "skipped" in results["seam"]  # the real-slide seam sweep is not part of --smoke

    scale = results["scale"]
    assert scale["x4"]["tiles"] > scale["x1"]["tiles"] > 0
    assert scale["x1"]["peak_rss_mib"] > 0
    tissue = results["tissue_skipping"]
    assert tissue["t60"]["tiles"] > tissue["t10"]["tiles"] > 0

    peer = results["peer"]
    assert peer["analysis_shape"] == [1024, 1024]  # the 2048² mosaic at 0.5 µm/px, read at 1 µm/px
    assert 0.5 < peer["ours"]["agreement"] <= 1.0 and peer["ours"]["output_mpx_per_s"] > 0
    if importlib.util.find_spec("monai") is None:
        assert "monai" in peer["skipped"]
    else:
        for name in (
            "sliding_window_512_0.25_gaussian",
            "patch_inferer_1024_0.5_avg",
            "patch_inferer_512_0.25_avg",
            "sliding_window_512_0.25_gaussian_hugetlb",
        ):
            run = peer[f"monai_{name}"]
            assert run["windows"] > 0 and 0.5 < run["agreement"] <= 1.0 and run["output_mpx_per_s"] > 0
            assert run["process_s"] > run["wall_s"]  # the whole process includes its imports

    giga = results["gigapixel"]
    assert giga["network"]["input_mpx_per_s"] > 0
    for label in ("x1", "x4"):
        run = giga[label]
        assert run["selected_chunks"] == run["tiles"]["processed"] > 0
        # No tiling computes less than the union of the halo windows (blocks get closer to it).
        assert 1.0 < run["floor_amplification"] <= run["amplification"] + 1e-9
        assert run["limit_s"] > 0 and run["peak_rss_mib"] > 0 and "exports_s" in run["timings_s"]
        # The whole process tree's CPU seconds: the smoke command runs for seconds on a core or more.
        assert run["cpu_s"] > 0.5 and 0 < run["limit_over_wall"] < run["limit_over_wall_ceiling_at_this_cpu"]
        assert len(run["repeats"]) == giga["repeats"] == 1 and run["repeats"][0]["wall_s"] == run["wall_s"]
    assert giga["x4"]["output_px"] > giga["x1"]["output_px"]
    assert set(giga["ratios"]) >= {"amplification_vs_floor", "limit_over_wall", "peak_rss_ratio_at_4x_area"}
    for tag in ("[scale]", "[tissue]", "[peer]", "[gigapixel]"):
        assert tag in proc.stdout


def test_gpu_script_skips_cleanly_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: benchmarks.gpu would run the full GPU benchmark")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped" in proc.stdout
