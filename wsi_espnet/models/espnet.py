"""ESPNet and ESPNet-C (Mehta et al., ECCV 2018, arXiv:1803.06815), exact to the official code.

The layer names follow the official repository (``sacmehta/ESPNet``, MIT licence) so that its
released checkpoints load with ``strict=True`` and no key mapping. Two reference defects are
fixed without breaking that compatibility:

* the reference decoder stores the encoder's children in ``self.modules``, shadowing
  :meth:`torch.nn.Module.modules` (which breaks ``DataParallel``); here the decoder simply calls
  the encoder's stages;
* the reference ``combine_l2_l3`` is an ESP block with ``classes`` outputs, so its branch width is
  ``classes // 5``: 0 channels (a crash) below 5 classes and a 1-channel bottleneck for 5-9
  classes, which is where tissue models live. ``decoder="wide"`` widens that block to
  ``max(classes, 20)`` channels and projects back with a 1x1 CBR; ``decoder="reference"`` keeps the
  official layout (the default, needed to load official weights).

Any input size works: inputs are padded (replicated edge) to a multiple of 8 and the output is
cropped back.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ESPNet", "ESPNetC", "convert_official_state_dict"]

OUTPUT_STRIDE = 8
WIDE_DECODER_MIN_WIDTH = 20


class CBR(nn.Module):
    """Convolution, BatchNorm (eps 1e-3) and per-channel PReLU."""

    def __init__(self, n_in: int, n_out: int, k_size: int, stride: int = 1) -> None:
        super().__init__()
        padding = (k_size - 1) // 2
        self.conv = nn.Conv2d(n_in, n_out, k_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(n_out, eps=1e-3)
        self.act = nn.PReLU(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class BR(nn.Module):
    """BatchNorm (eps 1e-3) and per-channel PReLU."""

    def __init__(self, n_out: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(n_out, eps=1e-3)
        self.act = nn.PReLU(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))


class C(nn.Module):
    """Bias-free convolution with 'same' padding."""

    def __init__(self, n_in: int, n_out: int, k_size: int, stride: int = 1) -> None:
        super().__init__()
        padding = (k_size - 1) // 2
        self.conv = nn.Conv2d(n_in, n_out, k_size, stride=stride, padding=padding, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class CDilated(nn.Module):
    """Bias-free dilated convolution with 'same' padding."""

    def __init__(self, n_in: int, n_out: int, k_size: int, stride: int = 1, d: int = 1) -> None:
        super().__init__()
        padding = ((k_size - 1) // 2) * d
        self.conv = nn.Conv2d(n_in, n_out, k_size, stride=stride, padding=padding, bias=False, dilation=d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _branch_widths(n_out: int) -> tuple[int, int]:
    """Widths of the four dilated branches (n) and the first one (n1 = n_out - 4n)."""
    n = n_out // 5
    if n == 0:
        raise ValueError(f"an ESP block needs at least 5 output channels, got {n_out}")
    return n, n_out - 4 * n


class _ESPBranches(nn.Module):
    """The five dilated branches (d = 1, 2, 4, 8, 16) with hierarchical feature fusion."""

    def _init_branches(self, n_out: int) -> int:
        n, n1 = _branch_widths(n_out)
        self.d1 = CDilated(n, n1, 3, 1, 1)
        self.d2 = CDilated(n, n, 3, 1, 2)
        self.d4 = CDilated(n, n, 3, 1, 4)
        self.d8 = CDilated(n, n, 3, 1, 8)
        self.d16 = CDilated(n, n, 3, 1, 16)
        return n

    def _fuse(self, reduced: torch.Tensor) -> torch.Tensor:
        """``cat[d1, d2, d2+d4, d2+d4+d8, d2+d4+d8+d16]``: HFF removes gridding artefacts."""
        add1 = self.d2(reduced)
        add2 = add1 + self.d4(reduced)
        add3 = add2 + self.d8(reduced)
        add4 = add3 + self.d16(reduced)
        return torch.cat([self.d1(reduced), add1, add2, add3, add4], 1)


class DownSamplerB(_ESPBranches):
    """Strided ESP block: a 3x3 stride-2 reduction, then the dilated branches, BN, PReLU."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        n = self._init_branches(n_out)
        self.c1 = C(n_in, n, 3, 2)
        self.bn = nn.BatchNorm2d(n_out, eps=1e-3)
        self.act = nn.PReLU(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self._fuse(self.c1(x))))


class DilatedParllelResidualBlockB(_ESPBranches):
    """ESP block: 1x1 reduction, dilated branches, residual added before BN + PReLU.

    (The official class name, typo included, is kept so that its role is easy to look up.)
    """

    def __init__(self, n_in: int, n_out: int, add: bool = True) -> None:
        super().__init__()
        n = self._init_branches(n_out)
        self.c1 = C(n_in, n, 1, 1)
        self.bn = BR(n_out)
        self.add = add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        combine = self._fuse(self.c1(x))
        if self.add:
            combine = x + combine
        return self.bn(combine)


class InputProjectionA(nn.Module):
    """Input reinforcement: the image average-pooled ``sampling_times`` times by 2."""

    def __init__(self, sampling_times: int) -> None:
        super().__init__()
        self.pool = nn.ModuleList(
            nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=True) for _ in range(sampling_times)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for pool in self.pool:
            x = pool(x)
        return x


def _pad_to_stride(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Replicate-pad H and W up to a multiple of the output stride; return the original size."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % OUTPUT_STRIDE, -w % OUTPUT_STRIDE
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return x, h, w


class ESPNetC(nn.Module):
    """ESPNet-C: the encoder, with a 1x1 classifier at 1/8 resolution.

    ``p`` (alpha_2) and ``q`` (alpha_3) are the numbers of ESP blocks at levels 2 and 3.
    ``forward`` returns logits at 1/8 of the input size (rounded up); ``features`` returns the
    intermediate maps the decoder needs.
    """

    output_stride = OUTPUT_STRIDE

    def __init__(self, classes: int = 20, p: int = 5, q: int = 3) -> None:
        super().__init__()
        self.classes, self.p, self.q = classes, p, q
        self.level1 = CBR(3, 16, 3, 2)
        self.sample1 = InputProjectionA(1)
        self.sample2 = InputProjectionA(2)
        self.b1 = BR(16 + 3)
        self.level2_0 = DownSamplerB(16 + 3, 64)
        self.level2 = nn.ModuleList(DilatedParllelResidualBlockB(64, 64) for _ in range(p))
        self.b2 = BR(128 + 3)
        self.level3_0 = DownSamplerB(128 + 3, 128)
        self.level3 = nn.ModuleList(DilatedParllelResidualBlockB(128, 128) for _ in range(q))
        self.b3 = BR(256)
        self.classifier = C(256, classes, 1, 1)

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encoder maps: level-1 output (16 ch, 1/2), its concat (19 ch), level-2 concat (131 ch,
        1/4) and level-3 concat (256 ch, 1/8)."""
        output0 = self.level1(x)
        output0_cat = self.b1(torch.cat([output0, self.sample1(x)], 1))
        output1_0 = self.level2_0(output0_cat)
        output1 = output1_0
        for layer in self.level2:
            output1 = layer(output1)
        output1_cat = self.b2(torch.cat([output1, output1_0, self.sample2(x)], 1))
        output2_0 = self.level3_0(output1_cat)
        output2 = output2_0
        for layer in self.level3:
            output2 = layer(output2)
        output2_cat = self.b3(torch.cat([output2_0, output2], 1))
        return {
            "level1": output0,
            "level1_cat": output0_cat,
            "level2_cat": output1_cat,
            "level3_cat": output2_cat,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = _pad_to_stride(x)
        logits = self.classifier(self.features(x)["level3_cat"])
        return logits[..., : -(-h // OUTPUT_STRIDE), : -(-w // OUTPUT_STRIDE)]


SkipSource = Literal["level1", "concat"]
DecoderKind = Literal["reference", "wide"]


def _up2(classes: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(classes, classes, 2, stride=2, padding=0, output_padding=0, bias=False)


class ESPNet(nn.Module):
    """ESPNet: ESPNet-C plus the light-weight decoder, logits at full input resolution.

    ``skip="level1"`` concatenates the 16-channel level-1 output before the last CBR (the
    official ``test/Model.py`` layout of the released Cityscapes decoder weights);
    ``skip="concat"`` uses the 19-channel level-1 concat (``train/Model.py``, CamVid weights).
    ``decoder="wide"`` fixes the reference bottleneck for fewer than 10 classes (module docstring).
    """

    output_stride = 1

    def __init__(
        self,
        classes: int = 20,
        p: int = 2,
        q: int = 3,
        skip: SkipSource = "level1",
        decoder: DecoderKind = "reference",
    ) -> None:
        super().__init__()
        if skip not in ("level1", "concat"):
            raise ValueError(f"skip must be 'level1' or 'concat', got {skip!r}")
        if decoder not in ("reference", "wide"):
            raise ValueError(f"decoder must be 'reference' or 'wide', got {decoder!r}")
        if decoder == "reference" and classes < 5:
            raise ValueError(f"the reference decoder needs >= 5 classes (got {classes}); use decoder='wide'")
        self.classes, self.p, self.q, self.skip, self.decoder = classes, p, q, skip, decoder
        self.encoder = ESPNetC(classes, p, q)
        self.level3_C = C(128 + 3, classes, 1, 1)
        self.br = nn.BatchNorm2d(classes, eps=1e-3)
        skip_channels = 16 if skip == "level1" else 19
        self.conv = CBR(skip_channels + classes, classes, 3, 1)
        self.up_l3 = nn.Sequential(_up2(classes))
        if decoder == "reference":
            self.combine_l2_l3 = nn.Sequential(
                BR(2 * classes), DilatedParllelResidualBlockB(2 * classes, classes, add=False)
            )
        else:
            width = max(classes, WIDE_DECODER_MIN_WIDTH)
            self.combine_l2_l3 = nn.Sequential(
                BR(2 * classes),
                DilatedParllelResidualBlockB(2 * classes, width, add=False),
                CBR(width, classes, 1, 1),
            )
        self.up_l2 = nn.Sequential(_up2(classes), BR(classes))
        self.classifier = _up2(classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = _pad_to_stride(x)
        f = self.encoder.features(x)
        output2_c = self.up_l3(self.br(self.encoder.classifier(f["level3_cat"])))
        output1_c = self.level3_C(f["level2_cat"])
        comb_l2_l3 = self.up_l2(self.combine_l2_l3(torch.cat([output1_c, output2_c], 1)))
        skip = f["level1"] if self.skip == "level1" else f["level1_cat"]
        logits = self.classifier(self.conv(torch.cat([comb_l2_l3, skip], 1)))
        return logits[..., :h, :w]


def convert_official_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an official ESPNet checkpoint to this implementation.

    The module names are identical, so the only work is dropping a ``module.`` prefix that
    ``DataParallel`` checkpoints carry; the function exists so callers need not know that.
    """
    return {k.removeprefix("module."): v for k, v in state_dict.items()}
