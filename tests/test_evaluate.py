"""Metrics from one global confusion matrix, whole-image vs tiled inference, and the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from wsi_espnet.models import ESPNet
from wsi_espnet.models.cards import Normalisation, load_card, write_card
from wsi_espnet.train import evaluate as ev
from wsi_espnet.train.commands import evaluate as evaluate_cli
from wsi_espnet.train.datasets import IGNORE_INDEX, Sample

NAMES = ["a", "b", "c"]


class RedIsOne(nn.Module):
    """A 'model' with known predictions: class 1 where the red channel is bright, else 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one = (x[:, 0] > 0.5).float()
        return torch.stack([1 - one, one, torch.zeros_like(one)], 1)


def test_iou_from_constructed_labels() -> None:
    truth = np.array([[0, 0, 1, 1], [2, 2, IGNORE_INDEX, IGNORE_INDEX]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 2]])
    cm = ev.confusion_matrix(truth, pred, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]  # ignore pixels not counted
    m = ev.metrics_from_confusion(cm, NAMES)
    assert m["iou"] == pytest.approx({"a": 1 / 3, "b": 2 / 3, "c": 1 / 2})
    assert m["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["pixel_accuracy"] == pytest.approx(4 / 6)
    assert m["pixels"] == 6


def test_absent_classes_do_not_count_and_iou_is_global() -> None:
    # Image 1: class 0 perfect (100 px). Image 2: class 0, 1 px right, 1 px called class 1.
    cm = ev.confusion_matrix(np.zeros(100, int), np.zeros(100, int), 3)
    cm += ev.confusion_matrix(np.array([0, 0]), np.array([0, 1]), 3)
    m = ev.metrics_from_confusion(cm, NAMES)
    assert m["iou"]["c"] is None  # neither present nor predicted
    assert m["iou"]["a"] == pytest.approx(101 / 102)  # not the per-image average (1 + 1/2) / 2
    assert m["iou"]["b"] == 0.0
    assert m["miou"] == pytest.approx((101 / 102 + 0) / 2)


def test_evaluate_model_with_known_predictions() -> None:
    card = load_card("breast-tissue-espnet")
    card = dataclasses.replace(card, normalisation=Normalisation(mean=(0.0,) * 3, std=(1.0,) * 3))
    image = np.zeros((300, 200, 3), np.uint8)
    image[:, 100:, 0] = 255  # right half predicted class 1
    labels = np.ones((300, 200), np.uint8)  # all class 1, top rows ignored
    labels[:50] = IGNORE_INDEX
    whole = ev.evaluate_model(RedIsOne(), card, [Sample("s", image, labels)])
    assert whole["iou"]["benign_epithelium"] == pytest.approx(0.5)
    assert whole["iou"]["background"] == 0.0
    assert whole["pixels"] == 250 * 200
    tiled = ev.predict_labels(RedIsOne(), card, image, geometry=(32, 8))  # 10 x 7 chunks, white margin
    assert np.array_equal(tiled, (image[..., 0] > 127).astype(np.uint8))


def test_evaluate_cli_writes_json(tmp_path: Path) -> None:
    torch.manual_seed(0)
    shipped = load_card("breast-tissue-espnet")
    weights = tmp_path / "m.pt"
    torch.save(ESPNet(**{k: v for k, v in shipped.architecture.items() if k != "name"}).state_dict(), weights)
    fields = {
        "name": "m",
        "architecture": shipped.architecture,
        "classes": shipped.class_table(),
        "mpp": 1.0,
    }
    card_path = tmp_path / "m.yaml"
    write_card(fields, card_path, weights)
    for sub in ("images", "masks"):
        (tmp_path / "data" / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "data/images/x.png")
    Image.fromarray(np.full((64, 80), 3, np.uint8)).save(tmp_path / "data/masks/x.png")
    out = tmp_path / "metrics.json"
    result = CliRunner().invoke(
        evaluate_cli, ["--model", str(card_path), str(tmp_path / "data"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "mIoU" in result.output and "normal_stroma" in result.output
    metrics = json.loads(out.read_text())
    assert np.array(metrics["confusion_matrix"]).sum() == 64 * 80
    assert metrics["support"]["normal_stroma"] == 64 * 80
