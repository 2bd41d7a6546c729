"""Options every command spells the same way: ``-o/--output``, ``--device`` and ``--tta``.

One convention across segment, demo, train and evaluate (issue 11): the output location is
always ``-o/--output``; the spellings it replaces (``--outdir``, ``--out``) still work for one
release as hidden aliases that print a deprecation warning. ``--device`` takes ``auto``, ``cpu``,
``cuda`` or ``cuda:N`` everywhere (``devices.resolve_device`` then checks CUDA is present).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class DeviceType(click.ParamType):
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; refused at parse time with click's usage line."""

    name = "DEVICE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip().lower()
        if not _DEVICE.fullmatch(text):
            self.fail(f"{value!r} is not a device: auto, cpu, cuda or cuda:N", param, ctx)
        return text


DEVICE = DeviceType()


def device_option(default: str = "auto") -> Callable[[Any], Any]:
    """``--device`` with the one grammar and its default shown."""
    return click.option(
        "--device", type=DEVICE, default=default, show_default=True, help="auto, cpu, cuda or cuda:N."
    )


def output_option(
    dest: str, help: str, legacy: str, required: bool = False, default: Path | None = None
) -> Callable[[Any], Any]:
    """``-o/--output`` stored as ``dest``, plus ``legacy`` (the old spelling) as a hidden alias.

    click cannot tell which of two options sharing one destination was typed, so the alias has
    its own and this decorator folds it into ``dest``, warning that the old name will go.
    """
    alias = f"legacy_{dest}"
    text = f"{help}  [required]" if required else help

    def decorate(func: Any) -> Any:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            old = kwargs.pop(alias)
            if old is not None:
                click.echo(f"Warning: {legacy} is deprecated and will be removed; use -o/--output", err=True)
                kwargs[dest] = old
            if required and kwargs[dest] is None:
                raise click.UsageError("Missing option '-o' / '--output'.")
            return func(*args, **kwargs)

        wrapper = click.option(legacy, alias, type=click.Path(path_type=Path), hidden=True)(wrapper)
        show = default is not None
        return click.option(
            "-o",
            "--output",
            dest,
            type=click.Path(path_type=Path),
            default=default,
            show_default=show,
            help=text,
        )(wrapper)

    return decorate


def tta_option(default: int = 1) -> Callable[[Any], Any]:
    """``--tta N``: average over N dihedral views. An int, checked by ``config`` so that a bad value
    is one ``Error:`` line (a ``click.Choice`` would print the usage block)."""
    return click.option(
        "--tta",
        type=int,
        default=default,
        show_default=True,
        help="Test-time augmentation: average over 1, 2, 4 or 8 flips/rotations.",
    )


def uncertain_option(default: bool = True) -> Callable[[Any], Any]:
    """``--uncertain/--no-uncertain``: the GeoJSON class of low-confidence tissue."""
    return click.option(
        "--uncertain/--no-uncertain",
        "geojson_uncertain",
        default=default,
        show_default=True,
        help="GeoJSON class 'Uncertain' for tissue below --low-confidence.",
    )


def confidence_options(defaults: Any) -> list[Callable[[Any], Any]]:
    """segment's ``--tta``, ``--low-confidence`` and ``--uncertain/--no-uncertain``."""
    return [
        tta_option(defaults.tta),
        click.option(
            "--low-confidence",
            type=float,
            default=defaults.low_confidence,
            show_default=True,
            help="Confidence (0-1) below which tissue counts as uncertain.",
        ),
        uncertain_option(defaults.geojson_uncertain),
    ]
