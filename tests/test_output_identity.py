"""Outputs that tell the truth: one folder per slide file, checked against run.json, and a
summary.csv that keeps the record of earlier commands. Every case runs separate commands."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from wsi_espnet.cli import main
from wsi_espnet.outputs import slide_stem

CMU = "wsi_derived_pyramids/CMU-1-Small-Region.pyramid"


def _segment(slide: Path, out: Path, card: Path, *extra: str):
    args = ["segment", slide, "-o", out, "--model", card, "--workers", "0", "--formats", "", *extra]
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _summary(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "summary.csv", newline="") as fh:
        return {row["slide"]: row for row in csv.DictReader(fh)}


def test_folder_name_is_the_file_name_minus_its_last_extension(tmp_path):
    assert slide_stem(Path("CMU-1.svs")) == "CMU-1"
    assert slide_stem(Path("CMU-1.pyramid.tif")) == "CMU-1.pyramid"
    assert slide_stem(Path("CMU-1.pyramid.ome.tif")) == "CMU-1.pyramid.ome"
    dicom = tmp_path / "1.2.826.0.1.3680043"
    dicom.mkdir()
    assert slide_stem(dicom) == "1.2.826.0.1.3680043"  # a DICOM folder keeps its whole name


def test_two_containers_of_one_slide_get_two_folders(shared_data, tmp_path, tissue_card):
    """The OME-TIFF and the generic TIFF of CMU-1, in two commands: neither is "skipped"."""
    out = tmp_path / "out"
    for suffix in (".ome.tif", ".tif"):
        result = _segment(shared_data / f"{CMU}{suffix}", out, tissue_card, "--mpp", "4")
        assert result.exit_code == 0, result.output
        assert "skipped" not in result.stdout
    for stem, name in [
        ("CMU-1-Small-Region.pyramid.ome", ".ome.tif"),
        ("CMU-1-Small-Region.pyramid", ".tif"),
    ]:
        run = json.loads((out / stem / "run.json").read_text())
        assert run["status"] == "complete"
        assert run["slide_file"]["path"] == str((shared_data / f"{CMU}{name}").resolve())
    assert {r["status"] for r in _summary(out).values()} == {"done"}


def test_same_name_from_another_file_fails_naming_both(small_slide, tmp_path, tissue_card):
    first, second = tmp_path / "a" / "small.tif", tmp_path / "b" / "small.tif"
    for copy in (first, second):
        copy.parent.mkdir()
        shutil.copy(small_slide, copy)
    out = tmp_path / "out"
    assert _segment(first, out, tissue_card).exit_code == 0
    run = json.loads((out / "small" / "run.json").read_text())
    assert run["slide_file"] == {
        "path": str(first.resolve()),
        "size": first.stat().st_size,
        "mtime": first.stat().st_mtime,
    }
    refused = _segment(second, out, tissue_card)
    assert refused.exit_code == 1 and refused.stdout == ""
    [line] = refused.stderr.splitlines()
    assert line.startswith("Error: ") and str(second) in line and str(first.resolve()) in line
    assert json.loads((out / "small" / "run.json").read_text()) == run  # the first results stay
    again = _segment(first, out, tissue_card)  # the same file: skipped, with the reason shown
    assert again.exit_code == 0
    row = next(line for line in again.stdout.splitlines() if line.startswith("small.tif"))
    assert "skipped" in row and "already complete" in row


def test_a_changed_file_is_not_skipped_as_complete(small_slide, tmp_path, tissue_card):
    slide = Path(shutil.copy(small_slide, tmp_path / "small.tif"))
    out = tmp_path / "out"
    assert _segment(slide, out, tissue_card).exit_code == 0
    with open(slide, "ab") as fh:
        fh.write(b"\0" * 16)  # the file changed after its results were made
    refused = _segment(slide, out, tissue_card)
    assert refused.exit_code == 1
    assert "changed" in refused.stderr and "--overwrite" in refused.stderr
    assert _segment(slide, out, tissue_card, "--overwrite").exit_code == 0


def test_summary_is_merged_across_commands(small_slide, tmp_path, tissue_card):
    from wsi_espnet.sample import write_sample_slide

    other = write_sample_slide(tmp_path / "other.tif", 600, 400, mpp=0.5, tissue_fraction=0.5, seed=2)
    out = tmp_path / "out"
    assert _segment(small_slide, out, tissue_card).exit_code == 0
    assert _segment(other, out, tissue_card).exit_code == 0
    rows = _summary(out)
    assert list(rows) == [str(small_slide), str(other)]
    assert {r["status"] for r in rows.values()} == {"done"}
    assert _segment(small_slide, out, tissue_card).exit_code == 0  # re-run: its row is updated
    rows = _summary(out)
    assert list(rows) == [str(small_slide), str(other)]
    assert rows[str(small_slide)]["status"] == "skipped" and rows[str(other)]["status"] == "done"


def test_summary_row_key_is_the_resolved_path(small_slide, tmp_path, tissue_card, monkeypatch):
    """A slide given once by absolute and once by relative path is one row, not two."""
    name = "small.tif"
    slide = Path(shutil.copy(small_slide, tmp_path / name))
    out = tmp_path / "out"
    assert _segment(slide, out, tissue_card).exit_code == 0
    monkeypatch.chdir(tmp_path)
    assert _segment(Path(name), out, tissue_card).exit_code == 0
    assert len(_summary(out)) == 1
