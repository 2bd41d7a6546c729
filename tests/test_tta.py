"""Test-time augmentation: views are transformed back correctly, and bad --tta values are refused.

Two real networks: a per-pixel (1x1 convolution) model, which is exactly dihedral-equivariant, so
averaging its views must give back the plain prediction for any input (a wrong inverse transform
would not); and the shipped ESPNet on a real H&E ROI, whose TTA output must be invariant under
the views it averages (TTA of a flipped input = the flipped TTA output).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from wsi_espnet.cli import main
from wsi_espnet.models.cards import load_card
from wsi_espnet.predict import Predictor
from wsi_espnet.tta import VIEWS, averaged_probabilities, views

ROI = "ynet_breast_biopsy/images/1222_1_1200_4800_4.png"
H, W = 120, 184  # non-square, multiples of 8 (the network's stride), so transposes change the shape


@pytest.fixture(scope="module")
def card(tissue_card):
    return load_card(str(tissue_card))


@pytest.fixture(scope="module")
def he_crop(shared_data) -> np.ndarray:
    """A non-square crop of a real H&E ROI (uint8 H×W×3)."""
    image = np.asarray(Image.open(shared_data / ROI).convert("RGB"))
    return np.ascontiguousarray(image[40 : 40 + H, 60 : 60 + W])


def _normalised(card, image: np.ndarray) -> torch.Tensor:
    return card.normalisation.apply(torch.from_numpy(image[None].copy()))


def test_views_are_the_dihedral_group_and_invert_exactly() -> None:
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    images = {tuple(v.apply(x).flatten().tolist()) for v in VIEWS}
    assert len(images) == 8  # eight different orientations
    for view in VIEWS:
        assert torch.equal(view.invert(view.apply(x)), x)
    assert [len(views(n)) for n in (1, 2, 4, 8)] == [1, 2, 4, 8]
    assert views(2)[1].dims == (-1,)  # the second view is the horizontal flip
    with pytest.raises(ValueError, match="1, 2, 4, 8"):
        views(3)


@pytest.mark.parametrize("n_views", [2, 4, 8])
def test_equivariant_model_gives_the_plain_prediction(card, he_crop, n_views: int) -> None:
    """A per-pixel network commutes with every view: TTA must equal no TTA, to float precision."""
    torch.manual_seed(0)
    model = nn.Conv2d(3, card.n_classes, 1).eval()
    x = _normalised(card, he_crop)
    with torch.inference_mode():
        plain = torch.softmax(model(x)[..., 8:-8, 8:-8], 1)
        probs, choice = averaged_probabilities(model, x, n_views, 8, tissue_only=True)
        tissue = torch.softmax(model(x)[:, 1:, 8:-8, 8:-8], 1)
    assert probs.shape == plain.shape == (1, card.n_classes, H - 16, W - 16)
    torch.testing.assert_close(probs, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(choice, tissue, atol=1e-6, rtol=0)
    # Through the predictor: uint8 outputs equal within the rounding of float sums.
    predictor = Predictor(card, "cpu", model=model)
    one = predictor.predict(he_crop[None], 8, tta=1)
    many = predictor.predict(he_crop[None], 8, tta=n_views)
    assert np.abs(one.scores.astype(int) - many.scores).max() <= 1
    assert np.abs(one.confidence.astype(int) - many.confidence).max() <= 1
    assert (one.labels == many.labels).mean() > 0.999


@pytest.mark.parametrize(
    ("n_views", "transform"),
    [
        (2, lambda t: torch.flip(t, (-1,))),
        (4, lambda t: torch.flip(t, (-2,))),
        (4, lambda t: torch.flip(t, (-2, -1))),
        (8, lambda t: t.transpose(-2, -1)),
        (8, lambda t: torch.rot90(t, 1, (-2, -1))),
    ],
    ids=["tta2-hflip", "tta4-vflip", "tta4-rot180", "tta8-transpose", "tta8-rot90"],
)
def test_tta_of_transformed_input_is_transformed_tta_output(card, he_crop, n_views: int, transform) -> None:
    """ESPNet is not equivariant, but its TTA average is invariant under the views it contains."""
    model = card.build_model().eval()
    x = _normalised(card, he_crop)
    with torch.inference_mode():
        probs, _ = averaged_probabilities(model, x, n_views, 16, tissue_only=False)
        moved, _ = averaged_probabilities(model, transform(x).contiguous(), n_views, 16, tissue_only=False)
        plain = torch.softmax(model(x)[..., 16:-16, 16:-16], 1)
        moved_plain = torch.softmax(model(transform(x).contiguous())[..., 16:-16, 16:-16], 1)
    torch.testing.assert_close(moved, transform(probs), atol=1e-5, rtol=0)
    # ...which the plain network is not (otherwise this test would prove nothing).
    assert (moved_plain - transform(plain)).abs().max() > 1e-3


def test_tta_on_a_symmetric_input_equals_no_tta(card, he_crop) -> None:
    """An input symmetric under the horizontal flip: the plain prediction of ESPNet averaged with
    its mirror is what TTA 2 gives, and the mirror of the input changes nothing."""
    half = he_crop[:, : W // 2]
    symmetric = np.ascontiguousarray(np.concatenate([half, half[:, ::-1]], axis=1))
    model = card.build_model().eval()
    x = _normalised(card, symmetric)
    with torch.inference_mode():
        probs, _ = averaged_probabilities(model, x, 2, 0, tissue_only=False)
        logits = model(x)
        expected = (torch.softmax(logits, 1) + torch.flip(torch.softmax(logits, 1), (-1,))) / 2
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(probs, torch.flip(probs, (-1,)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("value", ["3", "0", "16", "-1"])
def test_bad_tta_is_one_error_line(small_slide, tmp_path: Path, value: str) -> None:
    for args in (
        ["segment", str(small_slide), "-o", str(tmp_path / "out"), "--workers", "0", "--tta", value],
        ["evaluate", str(tmp_path), "--tta", value],
    ):
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert lines == [f"Error: --tta must be 1, 2, 4 or 8, got {value}"], result.output
    assert not (tmp_path / "out").exists()


def test_bad_tta_in_a_config_file_names_the_value(small_slide, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("tta: 6\n")
    result = CliRunner().invoke(
        main, ["segment", str(small_slide), "-o", str(tmp_path / "out"), "--config", str(config)]
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["Error: --tta must be 1, 2, 4 or 8, got 6"]
