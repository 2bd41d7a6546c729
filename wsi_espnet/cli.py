"""``wsi-espnet``: thin click commands; parsing and reporting only, the work lives in the library.

A user mistake (any :class:`~wsi_espnet.errors.WsiEspnetError`) prints one line,
``Error: <file>: <problem>``, and exits 1 without a traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Any, ClassVar

import click
from click.core import ParameterSource

from wsi_espnet import __version__
from wsi_espnet.cli_options import confidence_options, device_option, output_option, uncertain_option
from wsi_espnet.config import SegmentSettings
from wsi_espnet.errors import WsiEspnetError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Group(click.Group):
    """A click group that turns user errors into one-line messages, and loads ``train`` and
    ``evaluate`` only when one of them is run or listed: they import torch, whose import is
    most of a command's start-up (``segment``'s client never needs it)."""

    lazy: ClassVar[dict[str, str]] = dict.fromkeys(("train", "evaluate"), "wsi_espnet.train.commands")

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            self.add_command(getattr(importlib.import_module(self.lazy[cmd_name]), cmd_name))
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except WsiEspnetError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="wsi-espnet")
def main() -> None:
    """Segment H&E breast-biopsy whole-slide images into tissue classes with ESPNet.

    Start with `wsi-espnet demo`, then `wsi-espnet segment SLIDE -o OUTDIR`. Results open in
    QuPath (GeoJSON, OME-TIFF) and napari (OME-Zarr); see the README.
    """
    _configure_logging()


def _configure_logging() -> None:
    """Our messages (dashboard address, warnings) to stderr; Dask's chatter stays quiet."""
    logger = logging.getLogger("wsi_espnet")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for name in (
        "distributed",
        "distributed.scheduler",
        "distributed.worker",
        "distributed.core",
        "tifffile",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)


@main.command()
def models() -> None:
    """List the model cards shipped with wsi-espnet, their training state and evaluation."""
    from wsi_espnet.models.cards import DEFAULT_MODEL, list_cards

    rows = [("NAME", "CLASSES", "MPP", "PARAMS", "WEIGHTS", "TRAINED", "EVALUATION")]
    notes = []
    for card in list_cards():
        weights = "present" if card.weights_present else "missing"
        trained = "yes" if card.trained else "NO (untrained placeholder)"
        name = f"{card.name} (default)" if card.name == DEFAULT_MODEL else card.name
        evaluation = evaluation_line(card.extra.get("training") or {})
        rows.append(
            (
                name,
                str(card.n_classes),
                f"{card.mpp:g}",
                f"{card.n_parameters:,}",
                weights,
                trained,
                evaluation,
            )
        )
        if "demo" in card.description.lower():
            notes.append(f"{card.name} is a DEMO model, not for diagnosis: {card.description}")
    _print_table(rows)
    for note in notes:
        click.echo(note)


def evaluation_line(training: dict[str, Any]) -> str:
    """The card's leave-one-out figures (``training.loo_*``) in one line, or say there are none."""
    if training.get("loo_miou") is None:
        return "not evaluated"
    parts = [f"leave-one-out mIoU {training['loo_miou']:.3f}"]
    if training.get("loo_pixel_accuracy") is not None:
        parts.append(f"pixel accuracy {training['loo_pixel_accuracy']:.3f}")
    folds = str(training.get("loo_note", "")).split(" (")[0]
    return ", ".join(parts) + (f" ({folds})" if folds else "")


@main.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("--slide-mpp", type=float, help="Level-0 µm/px, for slides whose files carry none.")
def info(slide: Path, slide_mpp: float | None) -> None:
    """Show a slide's vendor, size, pyramid levels, resolution and the reader used."""
    from wsi_espnet.slide import Slide

    with Slide.open(slide, slide_mpp=slide_mpp) as opened:
        meta = opened.metadata()
    for key, value in meta.items():
        click.echo(f"{key:>18}: {value}")


_D = SegmentSettings()


def _segment_options(func: Any) -> Any:
    """segment's options; defaults come from :class:`SegmentSettings`, shown in click's style.

    Only options typed on the command line override a ``--config`` file (see :func:`_given`).
    """
    options = [
        output_option("outdir", "Output folder.", "--outdir", required=True),
        click.option("--model", default=_D.model, show_default=True, help="Model name or card YAML."),
        click.option(
            "--mpp", type=float, show_default="the model card's", help="Analysis resolution, µm/px."
        ),
        click.option("--slide-mpp", type=float, help="Level-0 µm/px for slides whose files carry none."),
        click.option("--tile", type=int, default=_D.tile, show_default=True, help="Output chunk edge (px)."),
        click.option("--halo", type=int, default=_D.halo, show_default=True, help="Context per side (px)."),
        click.option(
            "--block",
            type=int,
            show_default="from the device's memory",
            help="Inference block edge (px), a multiple of --tile.",
        ),
        click.option(
            "--batch-size", type=int, default=_D.batch_size, show_default=True, help="Tiles per pass."
        ),
        device_option(_D.device),
        click.option(
            "--workers",
            type=int,
            default=_D.workers,
            show_default=True,
            help="Local Dask worker processes; 0 runs in-process.",
        ),
        click.option(
            "--threads", type=int, default=_D.threads, show_default=True, help="Threads per worker."
        ),
        click.option(
            "--tissue-detection/--no-tissue-detection",
            default=_D.tissue_detection,
            show_default=True,
            help="Infer only chunks with tissue.",
        ),
        click.option(
            "--zarr-format",
            type=click.Choice(["2", "3"]),
            default=str(_D.zarr_format),
            show_default=True,
            help="2: OME-NGFF 0.4; 3: NGFF 0.5 sharded.",
        ),
        click.option(
            "--formats",
            default=",".join(_D.formats),
            show_default=True,
            help="Exports to write; '' for none.",
        ),
        click.option("--geojson-per-region", is_flag=True, help="One GeoJSON feature per region."),
        click.option(
            "--cluster", help="Cluster profile name (local, slurm, slurm-gpu, pbs, lsf, sge) or YAML."
        ),
        click.option("--jobs", type=int, help="Batch jobs to submit with a job-queue profile."),
        click.option("--adapt", help="Adaptive scaling MIN:MAX jobs."),
        click.option("--scheduler", help="Address of a running Dask scheduler (tcp://host:port)."),
        click.option(
            "--performance-report",
            type=click.Path(path_type=Path),
            help="Save Dask's performance report (HTML).",
        ),
        click.option(
            "--roi",
            type=click.Path(path_type=Path),
            help="QuPath GeoJSON export: segment only inside its polygons (a manifest 'roi' column wins).",
        ),
        click.option(
            "--roi-class",
            "roi_classes",
            multiple=True,
            help="Keep only ROI annotations of this QuPath class (repeatable).",
        ),
        *confidence_options(_D),
        click.option(
            "--qc",
            default=_D.qc,
            show_default=True,
            help="Artifact QC (pen, blur, fold): off, flag, or exclude them from the classes.",
        ),
        click.option("--overwrite", is_flag=True, help="Redo slides whose output is complete."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary table."),
        click.option(
            "--config",
            "config_file",
            type=click.Path(path_type=Path),
            help="YAML file with the same option names; the command line wins.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@main.command()
@click.argument("slides", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--manifest",
    type=click.Path(path_type=Path),
    help="CSV with a 'slide' column (optional 'slide_mpp', 'roi').",
)
@_segment_options
@click.pass_context
def segment(
    ctx: click.Context, slides: tuple[Path, ...], manifest: Path | None, outdir: Path, **options: Any
) -> None:
    """Segment whole-slide images (files or folders) into tissue classes.

    For each slide, OUTPUT/<name>/ receives the OME-Zarr store (class scores and label map),
    statistics (JSON, CSV), a QuPath GeoJSON, an OME-TIFF label image, an overlay PNG, an
    HTML report and run.json; <name> is the file name minus its last extension. OUTPUT/summary.csv
    lists every slide's status (merged with earlier runs). Re-running the same command resumes
    interrupted slides and skips finished ones.
    """

    jobs = _collect_jobs(slides, manifest)
    if not jobs:
        raise click.UsageError("give at least one slide, folder or --manifest")
    _run(jobs, outdir, _given(ctx, options))


def _given(ctx: click.Context, options: dict[str, Any]) -> dict[str, Any]:
    """The options the user typed (or set in the environment); the rest fall back to the
    ``--config`` file and then to :class:`SegmentSettings`, whose values the help shows."""
    typed = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    given = {k: v for k, v in options.items() if ctx.get_parameter_source(k) in typed}
    given["config_file"] = options.get("config_file")
    return given


@main.command()
@output_option(
    "outdir", "Folder for the synthetic slide and its results.", "--outdir", default=Path("wsi-espnet-demo")
)
@device_option()
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def demo(outdir: Path, device: str, quiet: bool) -> None:
    """Write a small synthetic H&E-like slide and segment it end to end.

    The slide is generated (clearly synthetic, not patient data) so the demo needs no download.
    """
    from wsi_espnet.runstate import SlideJob
    from wsi_espnet.sample import write_sample_slide

    outdir.mkdir(parents=True, exist_ok=True)
    slide = write_sample_slide(
        outdir / "synthetic-sample.tif", 4096, 3072, mpp=0.5, tissue_fraction=0.35, seed=7
    )
    click.echo(f"wrote synthetic sample slide {slide}", err=True)
    _run([SlideJob(slide)], outdir, {"device": device, "quiet": quiet, "overwrite": True})


def _run(jobs: list[Any], outdir: Path, options: dict[str, Any]) -> None:
    """Check everything a user can get wrong, then run; a run that cannot start prints only errors."""
    from wsi_espnet.config import load_settings
    from wsi_espnet.pipeline import run_segment
    from wsi_espnet.preflight import check_run

    config_file = options.pop("config_file", None)
    if options.get("zarr_format") is not None:
        options["zarr_format"] = int(options["zarr_format"])
    settings = load_settings(config_file, **options)
    refused = check_run(jobs, outdir, settings)
    if len(refused) == len(jobs):
        for failure in refused.values():
            click.echo(f"Error: {failure.error}", err=True)
        sys.exit(1)
    results = run_segment(jobs, outdir, settings, refused)
    failed = [r for r in results if r.status == "failed"]
    if not settings.quiet:
        _print_table(
            [("SLIDE", "STATUS", "SECONDS", "TILES", "TISSUE mm²", "REASON")]
            + [
                (
                    r.slide.name,
                    r.status,
                    f"{r.seconds:.1f}",
                    str(r.tiles_processed),
                    _fmt(r.tissue_area_mm2),
                    r.error,
                )
                for r in results
            ]
        )
        click.echo(f"results in {outdir}/ (summary.csv)", err=True)
    for result in failed:
        click.echo(f"Error: {result.error}", err=True)
    if failed:
        sys.exit(1)


def _collect_jobs(slides: tuple[Path, ...], manifest: Path | None) -> list[Any]:
    """Expand folders into slide files; missing files become jobs that fail with a clear error."""
    from wsi_espnet.runstate import SlideJob, read_manifest
    from wsi_espnet.slide import find_slides

    jobs: list[SlideJob] = []
    for path in slides:
        if path.is_dir():
            jobs.extend(SlideJob(p) for p in find_slides([path]))
        else:
            jobs.append(SlideJob(path))
    if manifest is not None:
        jobs.extend(read_manifest(manifest))
    return jobs


@main.command()
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--formats",
    default="geojson,ometiff,png,html",
    show_default=True,
    help="Comma-separated exports to write.",
)
@click.option("--geojson-per-region", is_flag=True, help="One GeoJSON feature per connected region.")
@click.option("--min-area-um2", type=float, help="Drop GeoJSON specks smaller than this (µm²).")
@click.option("--include-scores", is_flag=True, help="Also write per-class scores as an OME-TIFF.")
@uncertain_option(_D.geojson_uncertain)
def export(
    output: Path,
    formats: str,
    geojson_per_region: bool,
    min_area_um2: float | None,
    include_scores: bool,
    geojson_uncertain: bool,
) -> None:
    """Write exports again from an existing result folder OUTDIR/<name>."""
    from wsi_espnet.confidence import DEFAULT_LOW_CONFIDENCE
    from wsi_espnet.config import OutputSettings
    from wsi_espnet.export import export_all
    from wsi_espnet.export.uncertain import uncertain_threshold
    from wsi_espnet.store import open_store

    names = tuple(f.strip() for f in formats.split(",") if f.strip())
    settings = OutputSettings(
        names,
        geojson_per_region,
        min_area_um2,
        include_scores,
        geojson_uncertain=geojson_uncertain,
        # the run's threshold, which its statistics recorded, so GeoJSON and statistics agree
        low_confidence=uncertain_threshold(open_store(output), DEFAULT_LOW_CONFIDENCE),
    )
    written = export_all(output, settings=settings)
    for paths in written.values():
        for path in paths:
            click.echo(str(path))


@main.group(cls=_Group)
def cluster() -> None:
    """Cluster profiles for running on SLURM, PBS, LSF or SGE through dask-jobqueue."""


@cluster.command("list")
def cluster_list() -> None:
    """List the shipped cluster profiles."""
    from wsi_espnet.cluster import list_profiles

    _print_table(
        [("NAME", "KIND", "DESCRIPTION")] + [(p.name, p.kind, p.description) for p in list_profiles()]
    )


@cluster.command("show")
@click.argument("profile")
def cluster_show(profile: str) -> None:
    """Print the batch job script PROFILE (a name or a YAML path) would submit."""
    from wsi_espnet.cluster import job_script, load_profile

    click.echo(job_script(load_profile(profile)))


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
