"""``wsi-espnet train`` and ``wsi-espnet evaluate``: thin click commands over the Python API.

Register them on the main group with ``main.add_command(train)`` and
``main.add_command(evaluate)`` (``wsi_espnet.cli`` does).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import click

from wsi_espnet.cli_options import device_option, output_option, tta_option
from wsi_espnet.config import check_tta
from wsi_espnet.devices import resolve_device
from wsi_espnet.errors import ConfigError
from wsi_espnet.models.cards import DEFAULT_MODEL, ModelCard, load_card
from wsi_espnet.train import loop
from wsi_espnet.train.datasets import Sample, load_annotated_slides, load_folder
from wsi_espnet.train.evaluate import evaluate_model, format_table

_PATH = click.Path(path_type=Path)
_EXISTING = click.Path(exists=True, path_type=Path)
_DATA_MPP_HELP = "µm/px of the input images: a number, STEM=MPP (repeatable) or a CSV with stem,mpp."


def _command_line(ctx: click.Context) -> str:
    """The command as it would be typed, options at their defaults left out, for the card."""
    parts = ["wsi-espnet", ctx.info_name or "train"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if not isinstance(param, click.Option) or value == param.default or value in ((), None):
            continue
        flag = param.opts[-1] if param.is_flag and value else param.opts[0]
        if param.is_flag:
            parts.append(flag if value else param.secondary_opts[0])
        else:
            parts += [x for v in (value if param.multiple else [value]) for x in (flag, str(v))]
    return shlex.join(parts)


@click.command("train")
@output_option("run_dir", "Run directory.", "--outdir", required=True)
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Image folder.")
@click.option("--masks", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Mask folder.")
@click.option("--data-mpp", multiple=True, help=_DATA_MPP_HELP)
@click.option(
    "--slides", multiple=True, type=_EXISTING, help="Slides (repeatable), paired with --annotations."
)
@click.option("--annotations", multiple=True, type=_EXISTING, help="QuPath GeoJSON per slide, in order.")
@click.option("--slide-mpp", type=float, help="Level-0 µm/px for slides that do not record it.")
@click.option("--card", default=DEFAULT_MODEL, show_default=True, help="Model card: classes, colours, mpp.")
@click.option("--name", show_default="the card's name", help="Name of the trained model.")
@click.option(
    "--init",
    default="official-encoder",
    show_default=True,
    help="official-encoder | official-decoder | CARD | none.",
)
@click.option(
    "--reference-dir",
    type=_PATH,
    show_default="$WSI_ESPNET_REFERENCE or ../shared/reference/espnet",
    help="Official ESPNet weights.",
)
@click.option("--stage", type=click.Choice(["encoder", "decoder", "both"]), default="both", show_default=True)
@click.option("--epochs", type=int, default=10, show_default=True, help="Epochs per stage.")
@click.option("--encoder-epochs", type=int, show_default="--epochs", help="Epochs of the encoder stage.")
@click.option("--steps-per-epoch", type=int, default=50, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--crop", type=int, default=128, show_default=True, help="Crop size, a multiple of 8.")
@click.option("--lr", type=float, default=5e-4, show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--optimizer", type=click.Choice(["adam", "adamw"]), default="adam", show_default=True)
@click.option(
    "--lr-step",
    type=int,
    default=0,
    show_default=True,
    help="Epochs between LR halvings; 0: a third of the stage.",
)
@click.option("--lr-gamma", type=float, default=0.5, show_default=True)
@click.option("--val", multiple=True, help="Validation sample names (image stems or slide stems).")
@click.option("--val-fraction", type=float, default=0.0, show_default=True)
@click.option("--augment/--no-augment", default=True, show_default=True)
@click.option(
    "--normalise",
    type=click.Choice(["data", "card"]),
    default="data",
    show_default=True,
    help="Input mean/std from the training images or from the card.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@device_option()
@click.option("--resume", is_flag=True, help="Continue from RUN_DIR/checkpoints/last.pt.")
@click.pass_context
def train(ctx: click.Context, **options: object) -> None:
    """Train or fine-tune ESPNet; writes RUN_DIR/<name>.yaml + .pt for `segment --model`."""
    for key in ("data_mpp", "slides", "annotations", "val"):
        options[key] = tuple(options[key])  # type: ignore[arg-type]
    config = loop.TrainConfig(**options, command=_command_line(ctx))  # type: ignore[arg-type]
    result = loop.train(config)
    click.echo(f"model card: {result.card_path}")
    click.echo(f"weights:    {result.weights_path} ({result.weights_path.stat().st_size / 1e6:.2f} MB)")
    if result.val_metrics is not None:
        click.echo(format_table(result.val_metrics))
    click.echo(f"time: {result.seconds:.0f} s")


def _evaluation_samples(
    data: tuple[Path, ...],
    annotations: tuple[Path, ...],
    card: ModelCard,
    data_mpp: tuple[str, ...],
    slide_mpp: float | None,
) -> list[Sample]:
    """DATA folders hold ``images/`` + ``masks/``; DATA files are slides whose GeoJSON comes from
    ``--annotations`` (in order) or lies beside them as ``<stem>.geojson``."""
    folders = [d for d in data if d.is_dir()]
    slides = [d for d in data if not d.is_dir()]
    samples: list[Sample] = []
    for folder in folders:
        samples += load_folder(folder / "images", folder / "masks", card, data_mpp)
    if slides:
        geojsons = list(annotations) or [s.with_suffix(".geojson") for s in slides]
        missing = [g for g in geojsons if not g.is_file()]
        if missing:
            raise ConfigError("annotation file not found (use --annotations)", missing[0])
        samples += load_annotated_slides(slides, geojsons, card, slide_mpp)
    return samples


@click.command("evaluate")
@click.option(
    "--model", "model_name", default=DEFAULT_MODEL, show_default=True, help="Model card name or YAML."
)
@click.argument("data", nargs=-1, required=True, type=_EXISTING)
@click.option(
    "--annotations", multiple=True, type=_EXISTING, help="QuPath GeoJSON per slide in DATA, in order."
)
@click.option("--data-mpp", multiple=True, help=_DATA_MPP_HELP)
@click.option("--slide-mpp", type=float, help="Level-0 µm/px for slides that do not record it.")
@device_option()
@tta_option()
@output_option("out", "Write the metrics (with the confusion matrix) as JSON here.", "--out")
def evaluate(
    model_name: str,
    data: tuple[Path, ...],
    annotations: tuple[Path, ...],
    data_mpp: tuple[str, ...],
    slide_mpp: float | None,
    device: str,
    tta: int,
    out: Path | None,
) -> None:
    """Per-class IoU, mIoU, pixel accuracy and confusion matrix of a model on labelled DATA
    (image/mask folders, or slides with QuPath annotations: only annotated pixels count)."""
    check_tta(tta)  # before reading any data, like the device
    dev = resolve_device(device)  # before reading any data: a wrong device fails at once
    card = load_card(model_name)
    samples = _evaluation_samples(data, annotations, card, data_mpp, slide_mpp)
    metrics = evaluate_model(card.build_model().to(dev), card, samples, dev, tta=tta)
    click.echo(format_table(metrics))
    if out is not None:
        out.write_text(json.dumps(metrics, indent=2))
