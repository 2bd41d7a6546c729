"""User mistakes are found before any Dask cluster starts, and print only the error line(s).

click's CliRunner keeps stdout and stderr apart, so these tests assert the whole of stderr:
exactly one ``Error:`` line (plus click's usage lines for a bad option value), nothing on
stdout, and no output folder left behind for a run that never started.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from wsi_espnet.cli import main


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _only_error_line(result) -> str:
    """The one stderr line of a refused run; fails when anything else was printed."""
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


def test_missing_slide_prints_one_line_and_starts_nothing(tmp_path, tissue_card):
    out = tmp_path / "out"
    line = _only_error_line(_invoke("segment", tmp_path / "missing.svs", "-o", out, "--model", tissue_card))
    assert "missing.svs" in line and "no such file" in line
    assert not out.exists()


def test_unknown_model_prints_one_line(small_slide, tmp_path):
    line = _only_error_line(_invoke("segment", small_slide, "-o", tmp_path / "out", "--model", "nope"))
    assert "unknown model" in line and "nope" in line
    assert not (tmp_path / "out").exists()


def test_bad_option_values(small_slide, tmp_path, tissue_card):
    base = ["segment", small_slide, "-o", tmp_path / "out", "--model", tissue_card]
    line = _only_error_line(_invoke(*base, "--tile", "100"))
    assert line == "Error: --tile must be a positive multiple of 8, got 100"
    refused = _invoke(*base, "--device", "gpu")  # click's own parse error: usage line allowed
    assert refused.exit_code == 2 and refused.stdout == ""
    errors = [line for line in refused.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "'gpu' is not a device: auto, cpu, cuda or cuda:N" in errors[0]
    others = [line for line in refused.stderr.splitlines() if line and not line.startswith("Error:")]
    assert all(line.startswith(("Usage:", "Try ")) for line in others), refused.stderr
    assert not (tmp_path / "out").exists()


def test_unwritable_output_folder_prints_one_line(small_slide, tmp_path, tissue_card):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = _only_error_line(_invoke("segment", small_slide, "-o", blocker / "out", "--model", tissue_card))
    assert "a-file" in line and "not a folder" in line


def test_console_script_prints_only_the_error(tmp_path):
    """As a shell runs it: no dashboard address, no progress bar, no "results in"."""
    exe = shutil.which("wsi-espnet")
    args = [exe] if exe else [sys.executable, "-m", "wsi_espnet"]
    proc = subprocess.run(
        [*args, "segment", str(tmp_path / "nope.svs"), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"Error: {tmp_path / 'nope.svs'}: no such file"], proc.stderr
    assert proc.stdout == ""


def test_one_bad_slide_among_several_is_recorded_failed(small_slide, tmp_path, tissue_card):
    out = tmp_path / "out"
    missing = tmp_path / "missing.svs"
    result = _invoke(
        "segment", missing, small_slide, "-o", out, "--model", tissue_card, "--workers", "0", "--formats", ""
    )
    assert result.exit_code == 1
    with open(out / "summary.csv", newline="") as fh:
        rows = {r["slide"]: r for r in csv.DictReader(fh)}
    assert rows[str(missing)]["status"] == "failed" and "no such file" in rows[str(missing)]["error"]
    assert rows[str(small_slide)]["status"] == "done"
    header, *table = result.stdout.splitlines()
    assert header.split() == ["SLIDE", "STATUS", "SECONDS", "TILES", "TISSUE", "mm²", "REASON"]
    failed_row = next(line for line in table if line.startswith("missing.svs"))
    assert "failed" in failed_row and "no such file" in failed_row


def test_evaluate_refuses_an_absent_cuda_device_first(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: cuda:0 would be accepted")
    line = _only_error_line(_invoke("evaluate", tmp_path, "--device", "cuda:0"))
    assert line == "Error: --device cuda:0 but no CUDA device is available"
