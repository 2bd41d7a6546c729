"""The training loop: ``train(TrainConfig) -> TrainResult``.

It follows the official ESPNet recipe: an *encoder* stage trains ESPNet-C on labels reduced by
8 (majority vote), then a *decoder* stage trains the full network starting from it; Adam with
step decay and class weights ``1 / ln(1.10 + p_c)``. Its output is a model card plus weights that
``wsi-espnet segment --model RUN_DIR/<name>.yaml`` accepts as they are.

Determinism: each batch is drawn from a random generator seeded by (seed, stage, epoch, step),
never from a running stream, so a run resumed from ``checkpoints/last.pt`` (model, optimiser,
scheduler and scaler states) computes exactly the steps an uninterrupted run would.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from wsi_espnet.devices import resolve_device
from wsi_espnet.errors import ConfigError
from wsi_espnet.models import ESPNet
from wsi_espnet.models.cards import DEFAULT_MODEL, ModelCard, load_card, write_card
from wsi_espnet.resources import load_yaml
from wsi_espnet.train.augment import AugmentSettings, augment
from wsi_espnet.train.curves import plot_curves
from wsi_espnet.train.datasets import (
    IGNORE_INDEX,
    Sample,
    class_weights,
    data_normalisation,
    load_samples,
    split_samples,
)
from wsi_espnet.train.evaluate import evaluate_model
from wsi_espnet.train.init import default_reference_dir, initialise

STAGES = ("encoder", "decoder")
LOG_FIELDS = ("stage", "epoch", "lr", "loss", "val_miou", "val_pixel_accuracy", "seconds")


@dataclass
class TrainConfig:
    """Everything a run depends on; the CLI maps its options one to one onto these fields."""

    run_dir: Path
    card: str | Path = DEFAULT_MODEL
    name: str | None = None
    images: Path | None = None
    masks: Path | None = None
    data_mpp: tuple[str, ...] = ()
    slides: tuple[Path, ...] = ()
    annotations: tuple[Path, ...] = ()
    slide_mpp: float | None = None
    init: str = "official-encoder"
    reference_dir: Path | None = None
    stage: str = "both"
    epochs: int = 10
    encoder_epochs: int | None = None
    steps_per_epoch: int = 50
    batch_size: int = 8
    crop: int = 128
    lr: float = 5e-4
    weight_decay: float = 5e-4
    optimizer: str = "adam"
    lr_step: int = 0
    lr_gamma: float = 0.5
    val: tuple[str, ...] = ()
    val_fraction: float = 0.0
    augment: bool = True
    normalise: str = "data"
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    progress: bool = True
    command: str | None = None

    def stages(self) -> list[tuple[str, int]]:
        """(stage, epochs) in order: ``both`` runs the encoder stage, then the decoder stage."""
        enc = self.encoder_epochs if self.encoder_epochs is not None else self.epochs
        chosen = {"encoder": ["encoder"], "decoder": ["decoder"], "both": list(STAGES)}[self.stage]
        return [(s, enc if s == "encoder" else self.epochs) for s in chosen]

    def validate(self) -> None:
        if self.stage not in ("encoder", "decoder", "both"):
            raise ConfigError(f"--stage must be encoder, decoder or both, got {self.stage!r}")
        if self.crop % 8 or self.crop <= 0:
            raise ConfigError(f"--crop must be a positive multiple of 8, got {self.crop}")
        if self.optimizer not in ("adam", "adamw"):
            raise ConfigError(f"--optimizer must be adam or adamw, got {self.optimizer!r}")
        if self.normalise not in ("data", "card"):
            raise ConfigError(f"--normalise must be data or card, got {self.normalise!r}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if min(self.epochs, self.steps_per_epoch, self.batch_size) < 1:
            raise ConfigError("--epochs, --steps-per-epoch and --batch-size must be at least 1")
        if (self.images is None) != (self.masks is None):
            raise ConfigError("--images and --masks go together")
        if self.images is None and not self.slides:
            raise ConfigError("no training data: give --images/--masks or --slides/--annotations")


@dataclass
class TrainResult:
    """Where the trained model went, and how training went."""

    card_path: Path
    weights_path: Path
    card: ModelCard
    log: list[dict[str, Any]]
    val_metrics: dict[str, Any] | None
    seconds: float
    class_weights: list[float] = field(default_factory=list)


def downsample_labels(labels: torch.Tensor, n_classes: int, factor: int = 8) -> torch.Tensor:
    """Majority class of each ``factor``x``factor`` block (ignore pixels abstain; an all-ignore
    block stays ignore): the encoder stage's target at 1/8 resolution."""
    valid = torch.where(labels == IGNORE_INDEX, n_classes, labels)
    onehot = F.one_hot(valid, n_classes + 1)[..., :n_classes].permute(0, 3, 1, 2).float()
    counts = F.avg_pool2d(onehot, factor, ceil_mode=True)
    out = counts.argmax(1)
    out[counts.sum(1) == 0] = IGNORE_INDEX
    return out


class _UpsampledEncoder(nn.Module):
    """ESPNet-C with its 1/8 logits upsampled to the input size, so that the encoder stage can be
    validated with the same full-resolution metric as the decoder stage."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.encoder(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


def _batch(
    samples: list[Sample], config: TrainConfig, key: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch for one step, a pure function of ``key``: samples drawn in proportion to their
    labelled pixels, each as an augmented random crop."""
    rng = np.random.default_rng([config.seed, *key])
    weights = np.array([(s.labels != IGNORE_INDEX).sum() for s in samples], np.float64)
    settings = AugmentSettings() if config.augment else AugmentSettings.off()
    picks = rng.choice(len(samples), size=config.batch_size, p=weights / weights.sum())
    crops = [augment(samples[i], config.crop, rng, settings) for i in picks]
    images = torch.from_numpy(np.stack([c[0] for c in crops]))
    labels = torch.from_numpy(np.stack([c[1] for c in crops]).astype(np.int64))
    return images, labels


def _optimizer(params: Any, config: TrainConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def _write_log(rows: list[dict[str, Any]], run_dir: Path) -> None:
    with open(run_dir / "train_log.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot_curves(rows, run_dir / "train_curves.png")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(config: TrainConfig) -> TrainResult:
    """Train, checkpointing every epoch; write ``<name>.yaml``/``.pt``, the log and the curves."""
    config.validate()
    started, started_cpu = time.monotonic(), time.process_time()
    card = load_card(config.card)
    if card.architecture.get("name") != "espnet":
        raise ConfigError(
            f"training needs an 'espnet' architecture, the card has {card.architecture}", card.path
        )
    run_dir = Path(config.run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    previous_determinism = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        train_set, val_set = split_samples(load_samples(config, card), config)
        norm = data_normalisation(train_set) if config.normalise == "data" else card.normalisation
        card = dataclasses.replace(card, normalisation=norm)
        weights = class_weights(train_set, card.n_classes)
        _seed_everything(config.seed)
        model: ESPNet = ESPNet(**{k: v for k, v in card.architecture.items() if k != "name"})
        initialise(model, config.init, config.reference_dir or default_reference_dir())
        model.to(device)
        run = _Training(model, card, config, train_set, val_set, weights.to(device), device)
        rows, val_metrics = _run_stages(run)
    finally:
        torch.use_deterministic_algorithms(previous_determinism)
    seconds = (time.monotonic() - started, time.process_time() - started_cpu)
    return _save(run, rows, val_metrics, seconds)


@dataclass(frozen=True)
class _Training:
    """What every stage and the final save of one training run share."""

    model: ESPNet
    card: ModelCard
    config: TrainConfig
    train_set: list[Sample]
    val_set: list[Sample]
    weights: torch.Tensor  # class weights, on ``device``
    device: torch.device


@dataclass(frozen=True)
class _Stage:
    """One stage's network (ESPNet-C for ``encoder``) and its optimiser state."""

    index: int
    name: str
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR
    scaler: torch.amp.GradScaler

    def state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load(self, checkpoint: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])


def _make_stage(run: _Training, index: int, name: str, n_epochs: int) -> _Stage:
    net: nn.Module = run.model.encoder if name == "encoder" else run.model
    optimizer = _optimizer(net.parameters(), run.config)
    step = run.config.lr_step or max(1, -(-n_epochs // 3))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=run.config.lr_gamma)
    scaler = torch.amp.GradScaler("cuda", enabled=run.device.type == "cuda")
    return _Stage(index, name, net, optimizer, scheduler, scaler)


def _run_stages(run: _Training) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Every stage, epoch by epoch, with a checkpoint after each epoch (resumed with ``--resume``)."""
    config = run.config
    ckpt_path = Path(config.run_dir) / "checkpoints" / "last.pt"
    start_stage, start_epoch, rows, ckpt = 0, 0, [], None
    if config.resume:
        if not ckpt_path.is_file():
            raise ConfigError("--resume but no checkpoint found", ckpt_path)
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        run.model.load_state_dict(ckpt["model"])
        start_stage, start_epoch, rows = ckpt["stage_index"], ckpt["epoch"], list(ckpt["log"])
    val_metrics = None
    for stage_index, (name, n_epochs) in enumerate(config.stages()):
        if stage_index < start_stage:
            continue
        stage = _make_stage(run, stage_index, name, n_epochs)
        first_epoch = 0
        if ckpt is not None and stage_index == start_stage:
            stage.load(ckpt)
            first_epoch = start_epoch
        evaluated = _UpsampledEncoder(run.model.encoder) if name == "encoder" else run.model
        total = (n_epochs - first_epoch) * config.steps_per_epoch
        bar = tqdm(total=total, desc=f"{name} stage", disable=not config.progress)
        for epoch in range(first_epoch, n_epochs):
            tic = time.monotonic()
            loss, lr = _train_epoch(run, stage, epoch, bar)
            val_metrics = (
                evaluate_model(evaluated, run.card, run.val_set, run.device) if run.val_set else None
            )
            row = {
                "stage": name,
                "epoch": epoch + 1,
                "lr": lr,
                "loss": loss,
                "val_miou": "" if val_metrics is None else val_metrics["miou"],
                "val_pixel_accuracy": "" if val_metrics is None else val_metrics["pixel_accuracy"],
                "seconds": round(time.monotonic() - tic, 2),
            }
            rows.append(row)
            if val_metrics is not None:
                bar.set_postfix(loss=f"{row['loss']:.3f}", val_miou=f"{val_metrics['miou']:.3f}")
            checkpoint = {"model": run.model.state_dict(), **stage.state(), "stage_index": stage_index}
            torch.save({**checkpoint, "epoch": epoch + 1, "log": rows}, ckpt_path.with_suffix(".tmp"))
            ckpt_path.with_suffix(".tmp").replace(ckpt_path)
            _write_log(rows, Path(config.run_dir))
        bar.close()
        if stage_index == start_stage:
            ckpt = None
    return rows, val_metrics


def _train_epoch(run: _Training, stage: _Stage, epoch: int, bar: tqdm) -> tuple[float, float]:
    """One epoch of ``steps_per_epoch`` steps; returns (mean loss, the epoch's learning rate)."""
    card, device, use_amp = run.card, run.device, run.device.type == "cuda"
    stage.net.train()
    losses = []
    for i in range(run.config.steps_per_epoch):
        images, labels = _batch(run.train_set, run.config, (stage.index, epoch, i))
        x = card.normalisation.apply(images.to(device))
        y = labels.to(device)
        if stage.name == "encoder":
            y = downsample_labels(y, card.n_classes)
        with torch.autocast(device.type, enabled=use_amp):
            loss = F.cross_entropy(stage.net(x).float(), y, weight=run.weights, ignore_index=IGNORE_INDEX)
        stage.optimizer.zero_grad(set_to_none=True)
        stage.scaler.scale(loss).backward()
        stage.scaler.step(stage.optimizer)
        stage.scaler.update()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    lr = stage.scheduler.get_last_lr()[0]
    stage.scheduler.step()
    return float(np.mean(losses)), lr


def _save(
    run: _Training,
    rows: list[dict[str, Any]],
    val_metrics: dict[str, Any] | None,
    seconds: tuple[float, float],
) -> TrainResult:
    """Weights, card (sha256 filled in), log, curves and, with validation, ``val_metrics.json``.

    ``seconds`` is (wall, CPU) time; CPU time is what reproducing the model costs elsewhere."""
    model, card, config = run.model, run.card, run.config
    run_dir = Path(config.run_dir)
    name = config.name or card.name
    weights_path = run_dir / f"{name}.pt"
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, weights_path)
    fields = load_yaml(card.path, ConfigError, "a model card (a YAML mapping)")
    fields["name"] = name
    fields["input"] = {
        "channel_order": card.normalisation.channel_order,
        "scale": card.normalisation.scale,
        "mean": [float(v) for v in card.normalisation.mean],
        "std": [float(v) for v in card.normalisation.std],
    }
    fields["trained"] = True
    fields["training"] = {
        "command": config.command,
        "stages": [f"{s}:{e}" for s, e in config.stages()],
        "init": str(config.init),
        "data": [s.name for s in run.train_set],
        "val": [s.name for s in run.val_set],
        "val_miou": None if val_metrics is None else val_metrics["miou"],
        "class_weights": [round(float(w), 4) for w in run.weights],
        "seed": config.seed,
        "time_s": round(seconds[0], 1),
        "time_cpu_s": round(seconds[1], 1),
    }
    card_path = run_dir / f"{name}.yaml"
    written = write_card(fields, card_path, weights_path)
    _write_log(rows, run_dir)
    if val_metrics is not None:
        (run_dir / "val_metrics.json").write_text(json.dumps(val_metrics, indent=2))
    return TrainResult(
        card_path, weights_path, written, rows, val_metrics, seconds[0], fields["training"]["class_weights"]
    )
