"""Recognise DICOM WSI files and folders; the pixels are openslide's job (see :mod:`wsi_espnet.slide`).

A DICOM WSI is a series of Part 10 files, one per pyramid level plus label and overview, usually
in one folder (as Imaging Data Commons publishes them). Files are told by their magic bytes, not
their names, because some exporters write no extension.
"""

from __future__ import annotations

from pathlib import Path

# DICOM Part 10 files start with a 128-byte preamble and then these four bytes.
_DICOM_MAGIC = (128, b"DICM")


def is_dicom(path: Path) -> bool:
    """Whether ``path`` is a DICOM Part 10 file (by its magic bytes, whatever its name)."""
    offset, magic = _DICOM_MAGIC
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(len(magic)) == magic
    except OSError:
        return False


def dicom_file(folder: Path) -> Path | None:
    """One DICOM file of the WSI in ``folder`` (the first by name), or None if it holds none.

    Any file of a series will do: openslide opens the whole series from it, label and overview
    instances included. IDC and most converters name files ``*.dcm``; some write no extension.
    """
    for candidate in sorted(folder.iterdir()):
        if candidate.is_file() and candidate.suffix.lower() in (".dcm", "") and is_dicom(candidate):
            return candidate
    return None
