"""DICOM WSI: a folder (or one file) of a series, made here from CMU-1 with wsidicomizer, opens
through openslide with its mpp, and ``info`` and ``segment`` on it give the SVS's results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from wsi_espnet.cli import main
from wsi_espnet.errors import SlideError
from wsi_espnet.slide import Slide, find_slides
from wsi_espnet.store import SlideStore

SVS = "wsi_aperio_cmu1_small_region/CMU-1-Small-Region.svs"


def _cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def dicom_wsi(shared_data, tmp_path_factory) -> Path:
    """CMU-1-Small-Region.svs as a DICOM WSI folder, label and overview included.

    wsidicomizer passes the SVS's JPEG tiles through unchanged (no re-encoding) and adds no
    levels the SVS lacks, so its pixels are the SVS's exactly.
    """
    try:
        import wsidicomizer as dicomizer
    except (ImportError, OSError, RuntimeError) as exc:  # not installed, or no libturbojpeg0
        pytest.skip(f"wsidicomizer (the `test` extra, with Debian's libturbojpeg0) is needed: {exc}")
    folder = tmp_path_factory.mktemp("dicom") / "CMU-1-Small-Region.dicom"
    files = dicomizer.WsiDicomizer.convert(shared_data / SVS, folder, workers=1)
    assert len(files) >= 2  # the level and at least one of label, overview, thumbnail
    return folder


def test_folder_and_each_file_open_with_the_svs_mpp_and_pixels(dicom_wsi, shared_data):
    with Slide.open(shared_data / SVS) as svs:
        reference = svs.read_region(0, 0, 600, 400, 1.0)
        dimensions = svs.dimensions
    for path in [dicom_wsi, *sorted(dicom_wsi.iterdir())]:
        with Slide.open(path) as slide:
            assert slide.backend == "openslide" and slide.vendor == "dicom", path
            assert slide.mpp == pytest.approx(0.499) and slide.mpp_source == "openslide.mpp-x/y"
            assert slide.dimensions == dimensions
            assert np.array_equal(slide.read_region(0, 0, 600, 400, 1.0), reference), path


def test_find_slides_takes_a_dicom_folder_as_one_slide(dicom_wsi, shared_data, tmp_path):
    assert find_slides([dicom_wsi]) == [dicom_wsi]
    cohort = tmp_path / "cohort"  # an IDC download: one folder per slide, beside plain slides
    cohort.mkdir()
    (cohort / "b-series").symlink_to(dicom_wsi, target_is_directory=True)
    (cohort / "a.svs").symlink_to(shared_data / SVS)
    (cohort / "notes").mkdir()  # a folder without DICOM files is not a slide
    assert find_slides([cohort]) == [cohort / "a.svs", cohort / "b-series"]


def test_folder_without_dicom_files_is_a_clear_error(tmp_path):
    (tmp_path / "readme").write_text("not a slide")
    with pytest.raises(SlideError, match="folder without DICOM files") as info:
        Slide.open(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_info_shows_the_dicom_slide_and_its_mpp(dicom_wsi):
    result = _cli("info", dicom_wsi)
    assert result.exit_code == 0, result.output
    fields = dict(line.split(": ", 1) for line in result.output.splitlines())
    assert fields["backend".rjust(18)] == "openslide" and fields["vendor".rjust(18)] == "dicom"
    assert float(fields["mpp".rjust(18)]) == pytest.approx(0.499)
    assert fields["dimensions".rjust(18)] == "[2220, 2967]"


@pytest.mark.slow
def test_segment_on_the_dicom_folder_gives_the_svs_labels(dicom_wsi, shared_data, tissue_card, tmp_path):
    outputs = {}
    for name, slide in (("dicom", dicom_wsi), ("svs", shared_data / SVS)):
        outdir = tmp_path / name
        args = ("segment", slide, "-o", outdir, "--model", tissue_card, "--workers", "0", "-q")
        result = _cli(*args, "--formats", "")
        assert result.exit_code == 0, result.output
        outputs[name] = outdir
    store = outputs["dicom"] / "CMU-1-Small-Region.dicom" / "CMU-1-Small-Region.dicom.ome.zarr"
    dicom_labels = SlideStore.open(store).labels(0)[:]
    svs_labels = SlideStore.open(next(outputs["svs"].glob("*/*.ome.zarr"))).labels(0)[:]
    assert dicom_labels.shape == svs_labels.shape == (1481, 1108)
    assert np.array_equal(dicom_labels, svs_labels)  # the same pixels, so the same labels
    assert (svs_labels > 0).mean() > 0.2  # and there is tissue to compare
