"""ESPNet / ESPNet-C: exact to the official code (golden outputs), and usable on any input."""

from __future__ import annotations

import pytest
import torch

from wsi_espnet.models.espnet import ESPNet, ESPNetC, convert_official_state_dict

GOLDEN = [
    "golden_decoder_espnet_p_2_q_8.pt",
    "golden_encoder_espnet_p_2_q_8.pt",
    "golden_decoder_espnet_p_2_q_8_camvid.pt",
]


def _model_for(config: dict) -> torch.nn.Module:
    """Build the class a golden file's ``config`` names (train/Model.py = 19-channel skip)."""
    if config["class"] == "ESPNet_Encoder":
        return ESPNetC(config["classes"], config["p"], config["q"])
    skip = "concat" if config["model_code"].startswith("train/") else "level1"
    return ESPNet(config["classes"], config["p"], config["q"], skip=skip)


@pytest.mark.parametrize("golden_name", GOLDEN)
def test_golden_output_matches_official_code(espnet_reference, golden_name):
    golden = torch.load(espnet_reference / golden_name, weights_only=True)
    model = _model_for(golden["config"])
    state = torch.load(
        espnet_reference / golden["config"]["weights_file"], map_location="cpu", weights_only=True
    )
    model.load_state_dict(convert_official_state_dict(state), strict=True)
    model.eval()
    with torch.no_grad():
        out = model(golden["input"])
    assert out.shape == golden["output"].shape
    # float32 sums over deep dilated stacks differ in the last bits between CPU kernels (oneDNN
    # picks them per machine): the tolerance is relative to the logits' scale (up to ~900 here;
    # measured worst difference 0.0045, i.e. 5e-6 of it), and the decisions must be identical.
    scale = float(golden["output"].abs().max())
    assert torch.allclose(out, golden["output"], rtol=1e-4, atol=1e-5 * scale)
    assert torch.equal(out.argmax(1), golden["output"].argmax(1))


@pytest.mark.parametrize(
    "weights",
    [
        "encoder_espnet_p_2_q_3.pth",
        "encoder_espnet_p_2_q_5.pth",
        "encoder_espnet_p_2_q_8.pth",
        "decoder_espnet_p_2_q_3.pth",
        "decoder_espnet_p_2_q_5.pth",
        "decoder_espnet_p_2_q_8.pth",
        "decoder_espnet_p_2_q_8_camvid.pth",
    ],
)
def test_every_official_checkpoint_loads_strictly(espnet_reference, weights):
    state = torch.load(espnet_reference / weights, map_location="cpu", weights_only=True)
    q = int(weights.split("_q_")[1][0])
    if weights.startswith("encoder"):
        model = ESPNetC(20, 2, q)
    else:
        classes = state["classifier.weight"].shape[0]
        model = ESPNet(classes, 2, q, skip="concat" if "camvid" in weights else "level1")
    result = model.load_state_dict(convert_official_state_dict(state), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_parameter_counts_match_reference():
    assert sum(p.numel() for p in ESPNet(20, 2, 8).parameters()) == 364_569
    assert sum(p.numel() for p in ESPNetC(20, 2, 8).parameters()) == 349_449


def test_dataparallel_prefix_is_stripped():
    model = ESPNetC(4, 1, 1)
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}
    model.load_state_dict(convert_official_state_dict(prefixed), strict=True)


@pytest.mark.parametrize("shape", [(37, 53), (64, 64), (1, 1), (129, 250)])
@pytest.mark.parametrize("decoder", ["reference", "wide"])
def test_forward_backward_on_odd_sizes(shape, decoder):
    torch.manual_seed(0)
    model = ESPNet(8, 1, 2, decoder=decoder)
    x = torch.rand(2, 3, *shape, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 8, *shape)
    out.mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_encoder_output_is_one_eighth_rounded_up():
    out = ESPNetC(5, 1, 1)(torch.rand(1, 3, 37, 53))
    assert out.shape == (1, 5, 5, 7)


def test_reference_decoder_bottleneck_and_wide_fix():
    reference = ESPNet(8, 2, 8)
    # The reference squeezes 16 channels into one: branch width 8 // 5 == 1.
    assert reference.combine_l2_l3[1].c1.conv.out_channels == 1
    wide = ESPNet(8, 2, 8, decoder="wide")
    assert wide.combine_l2_l3[1].c1.conv.out_channels == 4
    assert ESPNet(3, 1, 1, decoder="wide")(torch.rand(1, 3, 16, 16)).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="decoder='wide'"):
        ESPNet(3, 1, 1)


def test_does_not_shadow_module_methods():
    model = ESPNet(20, 2, 3)
    assert callable(model.modules)
    assert sum(1 for _ in model.modules()) > 10


def test_wide_decoder_keeps_encoder_compatible_with_official_encoder(espnet_reference):
    state = torch.load(espnet_reference / "encoder_espnet_p_2_q_8.pth", map_location="cpu", weights_only=True)
    model = ESPNet(8, 2, 8, decoder="wide")
    encoder_state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    result = model.encoder.load_state_dict(encoder_state, strict=False)
    assert result.missing_keys == ["classifier.conv.weight"]
    assert not result.unexpected_keys
