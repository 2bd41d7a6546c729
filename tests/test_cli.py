"""The command line as a user meets it: help, listings, and one-line errors for every bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from wsi_espnet import __version__
from wsi_espnet.cli import main


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert errors, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def test_version_and_help():
    assert __version__ in _run("--version").output
    helped = _run("segment", "--help")
    assert helped.exit_code == 0
    for option in [
        "--model",
        "--mpp",
        "--slide-mpp",
        "--tile",
        "--halo",
        "--batch-size",
        "--device",
        "--workers",
    ]:
        assert option in helped.output
    assert "--tissue-detection / --no-tissue-detection" in helped.output


def test_models_lists_cards_and_training_state():
    result = _run("models")
    assert result.exit_code == 0
    assert "breast-tissue-espnet" in result.output
    assert "TRAINED" in result.output.splitlines()[0]


def test_info_on_real_svs(shared_data):
    result = _run("info", shared_data / "wsi_aperio_cmu1_small_region" / "CMU-1-Small-Region.svs")
    assert result.exit_code == 0
    assert "aperio" in result.output and "0.499" in result.output and "openslide" in result.output


def test_cluster_show_prints_a_job_script():
    result = _run("cluster", "show", "slurm-gpu")
    assert result.exit_code == 0 and "#SBATCH" in result.output and "--gres=gpu:1" in result.output


@pytest.fixture
def bad_inputs(tmp_path, small_slide):
    """Files a user might point the tool at by mistake."""
    import numpy as np
    from PIL import Image

    png = tmp_path / "photo.svs"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(png, format="PNG")
    text = tmp_path / "notes.svs"
    text.write_text("these are my notes\n")
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(small_slide.read_bytes()[: small_slide.stat().st_size // 2])
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    return {"png": png, "text": text, "truncated": truncated, "empty_dir": empty_dir}


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing", "no such file"),
        ("png", "photo.svs"),
        ("text", "notes.svs"),
        ("truncated", "truncated.tif"),
        ("empty_dir", "empty"),
    ],
)
def test_bad_slide_inputs_fail_with_one_line(case, needle, bad_inputs, tmp_path, tissue_card):
    target = tmp_path / "missing.svs" if case == "missing" else bad_inputs[case]
    result = _run("segment", target, "-o", tmp_path / "out", "--model", tissue_card, "--workers", "0", "-q")
    _assert_one_line_error(result, needle)
    assert not any((tmp_path / "out").glob("*/run.json"))


def test_slide_without_mpp_names_the_option(tmp_path, tissue_card):
    import numpy as np
    import tifffile

    slide = tmp_path / "nompp.tif"
    tifffile.imwrite(slide, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb")
    result = _run("segment", slide, "-o", tmp_path / "out", "--model", tissue_card, "--workers", "0", "-q")
    _assert_one_line_error(result, "nompp.tif", "--slide-mpp")
    ok = _run(
        "segment", slide, "-o", tmp_path / "out", "--model", tissue_card, "--workers", "0", "-q",
        "--slide-mpp", "0.5", "--formats", "",
    )  # fmt: skip
    assert ok.exit_code == 0, ok.output


def test_mpp_too_coarse_is_refused(small_slide, tmp_path, tissue_card):
    args = ["segment", small_slide, "-o", tmp_path / "out", "--model", tissue_card, "--workers", "0"]
    result = _run(*args, "--mpp", "1000")
    _assert_one_line_error(result, "small.tif", "too coarse")


def test_unknown_model_and_bad_weights(small_slide, tmp_path, tissue_card):
    _assert_one_line_error(
        _run("segment", small_slide, "-o", tmp_path / "o1", "--model", "nope"), "unknown model"
    )
    card = tmp_path / "card" / "c.yaml"
    card.parent.mkdir()
    fields = yaml.safe_load(tissue_card.read_text())
    weights = tissue_card.parent / fields["weights"]["file"]
    shutil.copy(weights, card.parent / "w.pt")
    fields["weights"] = {"file": "w.pt", "sha256": "0" * 64}
    card.write_text(yaml.safe_dump(fields))
    result = _run("segment", small_slide, "-o", tmp_path / "o2", "--model", card, "--workers", "0", "-q")
    _assert_one_line_error(result, "c.yaml", "sha256")
    (card.parent / "w.pt").unlink()
    result = _run("segment", small_slide, "-o", tmp_path / "o3", "--model", card, "--workers", "0", "-q")
    _assert_one_line_error(result, "weights file not found")


def test_unwritable_output_folder(small_slide, tmp_path, tissue_card):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = _run("segment", small_slide, "-o", blocker / "out", "--model", tissue_card, "--workers", "0")
    _assert_one_line_error(result, "a-file")


def test_bad_config_file_is_named(small_slide, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("tile: 512\nbogus_option: 3\n")
    result = _run("segment", small_slide, "-o", tmp_path / "out", "--config", config)
    _assert_one_line_error(result, "run.yaml", "bogus_option")


def test_real_process_exit_code_and_no_traceback(tmp_path):
    """The installed console script, as a shell would run it."""
    exe = shutil.which("wsi-espnet") or sys.executable
    args = [exe] if exe.endswith("wsi-espnet") else [exe, "-m", "wsi_espnet"]
    proc = subprocess.run(
        [*args, "segment", str(tmp_path / "nope.svs"), "-o", str(tmp_path / "out"), "--workers", "0", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "nope.svs" in proc.stderr and "no such file" in proc.stderr


def test_demo_runs_end_to_end(tmp_path):
    """The README's first command: a synthetic slide, segmented with the shipped model."""
    result = _run("demo", "-o", tmp_path, "-q")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "synthetic-sample"
    assert (folder / "synthetic-sample.report.html").is_file()
    run = json.loads((folder / "run.json").read_text())
    assert run["status"] == "complete" and run["model"]["trained"] is True
    assert run["statistics"]["tissue_area_mm2"] > 0.5  # ~35 % of 2.0 x 1.5 mm


def test_segment_client_checks_a_run_without_importing_torch(small_slide, tmp_path):
    """The client of ``segment`` (the CLI, the checks before the cluster, the modules that
    submit the tasks) never imports torch: it is most of a command's start-up. The packaged
    card's weights are still checked (sha256) before any cluster starts."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import wsi_espnet.cli, wsi_espnet.pipeline\n"
        "from wsi_espnet.config import load_settings\n"
        "from wsi_espnet.preflight import check_run\n"
        "from wsi_espnet.runstate import SlideJob\n"
        f"failed = check_run([SlideJob(Path({str(small_slide)!r}))], Path({str(tmp_path / 'out')!r}),"
        " load_settings(None))\n"
        "assert not failed, failed\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_training_commands_load_when_asked_for():
    """``train`` and ``evaluate`` are imported on demand, and listed with the others."""
    runner = CliRunner()
    listing = runner.invoke(main, ["--help"])
    assert listing.exit_code == 0 and "train" in listing.output and "evaluate" in listing.output
    for command in ("train", "evaluate"):
        result = runner.invoke(main, [command, "--help"])
        assert result.exit_code == 0 and "Usage: main " + command in result.output, result.output
