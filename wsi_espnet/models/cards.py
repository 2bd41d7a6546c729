"""Model cards: YAML files that fully describe a usable tissue model.

A card names the architecture and its parameters, the class table (value, name, RGB colour),
the analysis resolution in µm/px, the input normalisation and the weights file with its sha256.
The pipeline, the exports and the training loop all read the same card, so a model trained with
``wsi-espnet train`` is usable by ``wsi-espnet segment --model CARD.yaml`` with nothing else.

Weights are loaded with ``torch.load(..., weights_only=True)`` after their sha256 is verified;
cards are parsed with ``yaml.safe_load``: nothing in a card or checkpoint is ever executed.

Parsing a card needs no torch (``segment``'s client reads one before any cluster starts, and
importing torch costs it seconds): the architecture's name is checked then, its parameters when
the network is built (:meth:`ModelCard.build_model`), and torch is imported there.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from wsi_espnet.classes import ClassInfo
from wsi_espnet.errors import ModelCardError
from wsi_espnet.models import ARCHITECTURES, create_model
from wsi_espnet.resources import config_dir, find_named, load_yaml, packaged

if TYPE_CHECKING:
    import torch
    from torch import nn

DEFAULT_MODEL = "breast-tissue-espnet"


@dataclass(frozen=True)
class Normalisation:
    """``x = (pixel / scale - mean) / std`` per channel, after reordering to ``channel_order``."""

    channel_order: str = "RGB"
    scale: float = 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def apply(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC RGB tiles → float32 NCHW network input (on the tiles' device)."""
        import torch

        x = tiles.permute(0, 3, 1, 2).float()
        if self.channel_order == "BGR":
            x = x.flip(1)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x / self.scale - mean) / std


@dataclass(frozen=True)
class ModelCard:
    """A parsed, validated model card. ``path`` is the YAML file it came from."""

    name: str
    path: Path
    architecture: dict[str, Any]
    classes: tuple[ClassInfo, ...]
    mpp: float
    normalisation: Normalisation
    weights_file: Path | None
    weights_sha256: str | None
    trained: bool
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def weights_present(self) -> bool:
        return self.weights_file is not None and self.weights_file.is_file()

    @cached_property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self._network().parameters())

    @property
    def packaged(self) -> bool:
        """Shipped with wsi-espnet: its architecture and weights are checked by the test suite."""
        return self.path.parent == (config_dir() / "models").resolve()

    def class_table(self) -> list[dict[str, Any]]:
        return [c.as_dict() for c in self.classes]

    def verify_weights(self) -> Path:
        """The weights file, after checking that it exists and matches the card's sha256."""
        if self.weights_file is None:
            raise ModelCardError("the card names no weights file", self.path)
        if not self.weights_file.is_file():
            raise ModelCardError(f"weights file not found: {self.weights_file}", self.path)
        digest = sha256_file(self.weights_file)
        if self.weights_sha256 and digest != self.weights_sha256:
            raise ModelCardError(
                f"sha256 of {self.weights_file.name} is {digest[:16]}…, the card expects "
                f"{self.weights_sha256[:16]}… (corrupt or replaced weights)",
                self.path,
            )
        return self.weights_file

    def load_state_dict(self) -> dict[str, torch.Tensor]:
        """Verify the weights file against the card's sha256, then load it safely."""
        import torch

        self.verify_weights()
        try:
            state = torch.load(self.weights_file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelCardError(f"cannot load weights {self.weights_file.name}: {exc}", self.path) from exc
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ModelCardError(f"{self.weights_file.name} is not a state_dict", self.path)
        return state

    def build_model(self, load_weights: bool = True) -> nn.Module:
        """The network in eval mode, with verified weights unless ``load_weights`` is False."""
        model = self._network()
        if load_weights:
            state = self.load_state_dict()
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                first = str(exc).splitlines()[0]
                raise ModelCardError(
                    f"weights {self.weights_file.name} do not fit the card's architecture "
                    f"({self.n_classes} classes, {self.architecture}): {first}",
                    self.path,
                ) from exc
        return model.eval()

    def _network(self) -> nn.Module:
        """A fresh network of the card's architecture; bad parameters name the card."""
        try:
            return create_model(**self.architecture)
        except (TypeError, ValueError) as exc:
            raise ModelCardError(f"invalid architecture {self.architecture}: {exc}", self.path) from exc


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks (``hashlib.file_digest``)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _require(raw: dict[str, Any], key: str, path: Path) -> Any:
    if key not in raw:
        raise ModelCardError(f"model card is missing the '{key}' field", path)
    return raw[key]


def _parse_classes(raw: list[Any], path: Path) -> tuple[ClassInfo, ...]:
    classes = []
    for i, item in enumerate(raw):
        try:
            color = tuple(int(c) for c in item["color"])
            info = ClassInfo(int(item["value"]), str(item["name"]), color)  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelCardError(f"class #{i} needs value, name and color [r, g, b] ({exc})", path) from exc
        if len(info.color) != 3 or not all(0 <= c <= 255 for c in info.color):
            raise ModelCardError(f"class '{info.name}' color must be three integers 0..255", path)
        classes.append(info)
    if [c.value for c in classes] != list(range(len(classes))):
        raise ModelCardError("class values must be 0, 1, ..., N-1 in order", path)
    return tuple(classes)


def parse_card(raw: dict[str, Any], path: Path) -> ModelCard:
    """Validate a card's fields and resolve its weights path relative to the card file."""
    architecture = dict(_require(raw, "architecture", path))
    classes = _parse_classes(_require(raw, "classes", path), path)
    if architecture.get("classes") != len(classes):
        raise ModelCardError(
            f"wrong class count: architecture has {architecture.get('classes')} classes, "
            f"the class table {len(classes)}",
            path,
        )
    if architecture.get("name") not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelCardError(f"invalid architecture {architecture}: name must be one of {known}", path)
    mpp = float(_require(raw, "mpp", path))
    if not mpp > 0:
        raise ModelCardError(f"mpp must be positive, got {mpp}", path)
    norm = raw.get("input", {}) or {}
    normalisation = Normalisation(
        channel_order=str(norm.get("channel_order", "RGB")).upper(),
        scale=float(norm.get("scale", 255.0)),
        mean=tuple(float(v) for v in norm.get("mean", (0.0, 0.0, 0.0))),  # type: ignore[arg-type]
        std=tuple(float(v) for v in norm.get("std", (1.0, 1.0, 1.0))),  # type: ignore[arg-type]
    )
    if normalisation.channel_order not in ("RGB", "BGR"):
        raise ModelCardError(
            f"input.channel_order must be RGB or BGR, got {normalisation.channel_order}", path
        )
    weights = raw.get("weights") or {}
    weights_file = (path.parent / weights["file"]).resolve() if weights.get("file") else None
    known = {
        "name",
        "architecture",
        "classes",
        "mpp",
        "input",
        "weights",
        "trained",
        "description",
    }
    return ModelCard(
        name=str(raw.get("name", path.stem.removesuffix(".card"))),
        path=path,
        architecture=architecture,
        classes=classes,
        mpp=mpp,
        normalisation=normalisation,
        weights_file=weights_file,
        weights_sha256=weights.get("sha256"),
        trained=bool(raw.get("trained", False)),
        description=str(raw.get("description", "")),
        extra={k: v for k, v in raw.items() if k not in known},
    )


def list_cards() -> list[ModelCard]:
    """Every card shipped with the package, by name."""
    return [load_card(p) for p in packaged("models")]


def load_card(name_or_path: str | Path) -> ModelCard:
    """Load a shipped card by name, or any card by path to its YAML file."""
    path = find_named(name_or_path, "models", ModelCardError, "model")
    return parse_card(load_yaml(path, ModelCardError, "a model card (a YAML mapping)"), path.resolve())


def write_card(card_fields: dict[str, Any], path: Path, weights: Path) -> ModelCard:
    """Write a card YAML for ``weights`` (sha256 filled in) and return it parsed.

    Used by training so that its output is directly accepted by ``segment --model``.
    """
    fields = dict(card_fields)
    rel = Path(weights).resolve()
    with contextlib.suppress(ValueError):  # weights outside the card's folder stay absolute
        rel = rel.relative_to(Path(path).resolve().parent)
    fields["weights"] = {"file": str(rel), "sha256": sha256_file(Path(weights))}
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return load_card(path)


def random_card(card: ModelCard, folder: Path, name: str, seed: int = 0) -> ModelCard:
    """``card``'s architecture with seeded random weights, written to ``folder/<name>.yaml``.

    For tests and benchmarks where the trained weights are absent: shapes, speed and the
    pipeline do not depend on the weights' values. Marked ``trained: false``.
    """
    fields = load_yaml(card.path, ModelCardError, "a model card (a YAML mapping)")
    fields.update(name=name, trained=False)
    import torch

    torch.manual_seed(seed)
    weights = Path(folder) / f"{name}.pt"
    torch.save(create_model(**fields["architecture"]).state_dict(), weights)
    return write_card(fields, Path(folder) / f"{name}.yaml", weights)
