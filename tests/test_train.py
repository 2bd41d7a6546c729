"""Training on the real Y-Net ROIs: loss goes down, one ROI over-fits, resume is exact, CLI output
is a card that `segment --model` accepts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from wsi_espnet.errors import ConfigError
from wsi_espnet.models.cards import load_card
from wsi_espnet.train.commands import train as train_cli
from wsi_espnet.train.datasets import IGNORE_INDEX, Sample, load_folder, read_mask
from wsi_espnet.train.evaluate import evaluate_model
from wsi_espnet.train.loop import TrainConfig, downsample_labels, initialise, train

ROI = "1222_1_1200_4800_4"  # scale 4: ~1.0 µm/px, the card's mpp already


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def rois(shared_data: Path) -> Path:
    return shared_data / "ynet_breast_biopsy"


def _config(run_dir: Path, rois: Path, **kw: object) -> TrainConfig:
    base = {
        "images": rois / "images",
        "masks": rois / "masks",
        "data_mpp": (f"{ROI}=1.0", "1222_1_7200_3600_2=0.5", "0.33"),
        "init": "none",
        "stage": "decoder",
        "batch_size": 4,
        "crop": 64,
        "progress": False,
    }
    return TrainConfig(run_dir=run_dir, **{**base, **kw})  # type: ignore[arg-type]


def test_folder_is_resampled_to_card_mpp(rois: Path) -> None:
    samples = load_folder(
        rois / "images", rois / "masks", load_card("breast-tissue-espnet"), (f"{ROI}=1.0", "0.5")
    )
    shapes = {s.name: s.labels.shape for s in samples}
    assert shapes[ROI] == (384, 384)
    assert shapes["1339_1_1000_9800_1.33"] == (192, 192)
    assert all(s.image.shape[:2] == s.labels.shape for s in samples)
    assert set(np.unique(samples[0].labels)) <= set(range(8))


def test_rgb_mask_with_unequal_channels_is_refused(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 1
    Image.fromarray(rgb).save(tmp_path / "m.png")
    with pytest.raises(ConfigError, match="channels differ"):
        read_mask(tmp_path / "m.png", 8)


def test_encoder_targets_are_block_majorities() -> None:
    labels = torch.full((1, 16, 16), IGNORE_INDEX)
    labels[0, :8, :8] = 2
    labels[0, :3, :8] = 5  # 24 px of 5 vs 40 px of 2
    labels[0, 8:, 8:12] = 1  # half the block labelled, the rest ignored
    out = downsample_labels(labels, 8)
    assert out.tolist() == [[[2, IGNORE_INDEX], [IGNORE_INDEX, 1]]]


def test_official_encoder_init_keeps_random_classifier(espnet_reference: Path) -> None:
    from wsi_espnet.models import ESPNet

    model = ESPNet(8, 2, 8, decoder="wide")
    left = initialise(model, "official-encoder", espnet_reference)
    official = torch.load(
        espnet_reference / "encoder_espnet_p_2_q_8.pth", map_location="cpu", weights_only=True
    )
    assert torch.equal(model.encoder.level3[7].c1.conv.weight, official["level3.7.c1.conv.weight"])
    assert "encoder.classifier.conv.weight" in left
    assert all(k.startswith("encoder.classifier") for k in left if k.startswith("encoder."))


def test_few_steps_lower_the_loss(tmp_path: Path, rois: Path) -> None:
    result = train(_config(tmp_path, rois, epochs=3, steps_per_epoch=12, lr=2e-3, lr_step=10, augment=False))
    losses = [row["loss"] for row in result.log]
    assert losses[2] < losses[1] < losses[0] and losses[2] < 0.95 * losses[0], losses
    assert (tmp_path / "train_log.csv").read_text().count("\n") == 4
    assert (tmp_path / "train_curves.png").stat().st_size > 1000


def test_overfits_one_roi_crop(tmp_path: Path, rois: Path) -> None:
    image = np.asarray(Image.open(rois / "images" / f"{ROI}.png").convert("RGB"))[144:240, 144:240]
    labels = read_mask(rois / "masks" / f"{ROI}.png", 8)[144:240, 144:240]
    for sub, array in (("images", image), ("masks", labels)):
        (tmp_path / sub).mkdir()
        Image.fromarray(array).save(tmp_path / sub / "crop.png")
    config = _config(
        tmp_path / "run",
        rois,
        images=tmp_path / "images",
        masks=tmp_path / "masks",
        data_mpp=(),
        crop=96,
        batch_size=2,
        epochs=2,
        steps_per_epoch=50,
        lr=1e-2,
        lr_step=1,
        augment=False,
    )
    result = train(config)
    card = load_card(result.card_path)  # what `segment --model RUN_DIR/<name>.yaml` loads
    model = card.build_model().eval()
    with torch.no_grad():  # the crop exactly as it was trained on: over-fitted
        seen = model(card.normalisation.apply(torch.from_numpy(image)[None]))[0].argmax(0).numpy()
    assert np.mean(seen == labels) > 0.9
    # Scored as segment would label it, the crop sits in a white margin the network never saw in
    # training, and every pixel of a 96-px crop is near that edge (measured 0.83, alone 0.91).
    metrics = evaluate_model(model, card, [Sample("crop", image, labels)])
    assert metrics["pixel_accuracy"] > 0.78, metrics


def test_resume_continues_exactly(tmp_path: Path, rois: Path) -> None:
    kw = {"epochs": 2, "steps_per_epoch": 3, "lr_step": 1, "val": (ROI,)}
    straight = train(_config(tmp_path / "a", rois, **kw))
    train(_config(tmp_path / "b", rois, **{**kw, "epochs": 1}))  # "interrupted" after epoch 1
    resumed = train(_config(tmp_path / "b", rois, **kw, resume=True))
    assert [r["epoch"] for r in resumed.log] == [1, 2]
    assert resumed.log[1]["loss"] == pytest.approx(straight.log[1]["loss"], abs=1e-6)
    a = torch.load(straight.weights_path, weights_only=True)
    b = torch.load(resumed.weights_path, weights_only=True)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_cli_writes_card_weights_log_and_curves(tmp_path: Path, rois: Path) -> None:
    run = tmp_path / "run"
    args = [
        "-o",
        str(run),
        "--images",
        str(rois / "images"),
        "--masks",
        str(rois / "masks"),
        "--data-mpp",
        "0.5",
        "--init",
        "none",
        "--epochs",
        "1",
        "--encoder-epochs",
        "1",
        "--steps-per-epoch",
        "2",
        "--batch-size",
        "2",
        "--crop",
        "64",
        "--val-fraction",
        "0.2",
        "--name",
        "tiny",
    ]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 0, result.output
    card = load_card(run / "tiny.yaml")
    assert card.trained and card.weights_sha256 and card.n_classes == 8
    assert card.extra["training"]["command"].startswith("wsi-espnet train -o")
    assert card.extra["training"]["stages"] == ["encoder:1", "decoder:1"]
    assert len(card.extra["training"]["val"]) == 1
    card.build_model()  # sha256 verified, strict load
    assert (run / "train_log.csv").is_file() and (run / "train_curves.png").is_file()
    assert (run / "checkpoints" / "last.pt").is_file()


def test_bad_crop_is_a_user_error(tmp_path: Path, rois: Path) -> None:
    with pytest.raises(ConfigError, match="multiple of 8"):
        train(_config(tmp_path, rois, crop=60))
