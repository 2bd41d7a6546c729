"""One CLI convention across commands: -o/--output, --device grammar, defaults, no stray folders."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from wsi_espnet.cli import main


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("command", ["segment", "demo", "train", "evaluate"])
def test_every_command_names_its_output_the_same_way(command):
    helped = _invoke(command, "--help")
    assert helped.exit_code == 0
    assert "-o, --output PATH" in helped.output
    assert "--outdir" not in helped.output and "--out " not in helped.output  # hidden aliases
    assert "--device DEVICE" in helped.output and "auto, cpu, cuda or cuda:N." in helped.output


def test_defaults_are_shown_in_clicks_style():
    segment = " ".join(_invoke("segment", "--help").output.split())
    for text in [
        "--zarr-format [2|3]",
        "[default: 2]",
        "[default: 512]",
        "[default: 256]",
        "[default: auto]",
    ]:
        assert text in segment, text
    assert "[4]" not in segment and "[512]" not in segment and "[auto]" not in segment  # the old style
    demo = " ".join(_invoke("demo", "--help").output.split())
    assert "Folder for the synthetic slide and its results. [default: wsi-espnet-demo]" in demo
    train = " ".join(_invoke("train", "--help").output.split())
    assert "[a third of the stage]" not in train and "(default:" not in train


def test_old_output_spellings_still_work_with_a_warning(small_slide, tmp_path, tissue_card):
    args = ["segment", small_slide, "--model", tissue_card, "--workers", "0", "--formats", "", "-q"]
    result = _invoke(*args, "--outdir", tmp_path / "old")
    assert result.exit_code == 0, result.output
    assert "Warning: --outdir is deprecated and will be removed; use -o/--output" in result.stderr
    assert (tmp_path / "old" / "small" / "run.json").is_file()
    missing = _invoke("segment", small_slide)
    assert missing.exit_code == 2 and "Missing option '-o' / '--output'." in missing.stderr


def test_evaluate_keeps_out_as_an_alias(tmp_path):
    result = _invoke("evaluate", tmp_path, "--out", tmp_path / "m.json", "--device", "bogus")
    assert result.exit_code == 2 and "'bogus' is not a device" in result.stderr


def test_train_accepts_cuda_n(tmp_path):
    """cuda:N gets past the parser (it used to be refused as not one of auto, cpu, cuda)."""
    result = _invoke("train", "-o", tmp_path / "run", "--device", "cuda:1", "--epochs", "0")
    assert "Invalid value for '--device'" not in result.output
    assert result.exit_code == 1 and result.stderr.startswith("Error: --epochs")  # the next check


def test_cluster_show_leaves_no_log_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _invoke("cluster", "show", "slurm")
    assert result.exit_code == 0 and "dask-logs/" in result.output  # the script still names it
    assert not Path("dask-logs").exists()
    Path("dask-logs").mkdir()  # an existing folder of the user's is left alone
    assert _invoke("cluster", "show", "pbs").exit_code == 0 and Path("dask-logs").is_dir()


def test_models_shows_the_evaluation_and_that_the_default_is_a_demo():
    result = _invoke("models")
    assert result.exit_code == 0
    header, row, *notes = result.output.splitlines()
    assert header.split()[-1] == "EVALUATION"
    assert row.startswith("breast-tissue-espnet (default)")
    assert "leave-one-out mIoU 0.155, pixel accuracy 0.589 (5 folds)" in row
    assert any(n.startswith("breast-tissue-espnet is a DEMO model, not for diagnosis") for n in notes)
