"""Checks made in the client before any Dask cluster starts: a user mistake costs no cluster.

Run-wide problems (the model card or its weights, the output folder) are raised as one-line
errors; a slide that cannot be used (missing, unreadable, no resolution, an output folder made
from another file) becomes a :class:`~wsi_espnet.runstate.Failed` value so the other slides run.
"""

from __future__ import annotations

import os
from pathlib import Path

from wsi_espnet.config import SegmentSettings
from wsi_espnet.errors import OutputError, WsiEspnetError
from wsi_espnet.models.cards import load_card
from wsi_espnet.outputs import SlideOutput, check_same_slide, slide_stem
from wsi_espnet.roi import check_roi
from wsi_espnet.runstate import Failed, SlideJob
from wsi_espnet.slide import Slide, check_resolution


def check_output_dir(outdir: Path, create: bool = True) -> None:
    """Fail early, with the folder's name, when results could not be written there.

    With ``create=False`` nothing is made: the nearest existing folder above must be writable,
    so a run refused for another reason leaves no empty output folder behind.
    """
    outdir = Path(outdir)
    if create:
        try:
            outdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create output folder: {exc.strerror}", outdir) from exc
    existing = next((p for p in (outdir, *outdir.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise OutputError(f"cannot create output folder: {existing} is not a folder", outdir)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError("output folder is not writable", existing)


def check_run(jobs: list[SlideJob], outdir: Path, settings: SegmentSettings) -> dict[SlideJob, Failed]:
    """Check the model, the output folder and every slide; returns the slides that cannot run.

    Raises (a :class:`WsiEspnetError`) for problems that concern the whole run.
    """
    card = load_card(settings.model)
    if card.packaged:
        # Its sha256 and presence, without torch (seconds of every command's start-up): the
        # shipped cards' architectures and weights are loaded strictly by the test suite.
        card.verify_weights()
    else:
        card.build_model()  # a user's card: the architecture built, the weights loaded strictly
    mpp = settings.mpp or card.mpp
    check_output_dir(outdir, create=False)
    failures: dict[SlideJob, Failed] = {}
    seen: dict[str, Path] = {}
    for job in jobs:
        stem = slide_stem(job.path)
        if stem in seen:
            error = f"{job.path}: same output name '{stem}' as {seen[stem]}; rename one"
            failures[job] = Failed(job, error)
            continue
        seen[stem] = job.path
        try:
            frame = check_slide(job, settings.slide_mpp, mpp)
            output = SlideOutput.for_slide(outdir, job.path)
            check_same_slide(output, job.path, settings.overwrite)
            check_roi(job, settings, frame, output)
        except WsiEspnetError as exc:
            failures[job] = Failed(job, str(exc))
    return failures


def check_slide(
    job: SlideJob, slide_mpp: float | None, mpp: float
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The slide exists, opens, has a resolution (its own, the job's or ``--slide-mpp``) and can
    be analysed at ``mpp``; returns its level-0 dimensions and bounds offset (for the ROI check)."""
    with Slide.open(job.path, slide_mpp=job.slide_mpp or slide_mpp) as slide:
        check_resolution(slide, mpp)
        return slide.dimensions, slide.bounds_offset
