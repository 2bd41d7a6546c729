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

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {"machine", "profile", "efficiency", "seam", "peer", "scale", "tissue_skipping"} <= results.keys()
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
    assert peer["ours_all_tiles"]["tiles"] >= peer["ours_tissue"]["tiles"]
    if importlib.util.find_spec("monai") is None:
        assert "monai" in peer["skipped"]
    else:
        assert peer["monai_patch_inferer"]["tiles"] > 0
        assert 0.5 < peer["monai_patch_inferer"]["agreement_on_tissue"] <= 1.0
    assert "[scale]" in proc.stdout and "[tissue]" in proc.stdout


def test_gpu_script_skips_cleanly_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: benchmarks.gpu would run the full GPU benchmark")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped" in proc.stdout
