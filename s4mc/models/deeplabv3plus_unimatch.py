"""UniMatch's DeepLabv3+ decoder (`net.decoder.type: deeplabv3_plus_unimatch`), in UniMatch's layout.

It differs from the U2PL-lineage decoder of deeplabv3plus.py (docs/method.md, "UniMatch
release-exact", item 1): a 1x1 ASPP projection, no dropout, no conv bias but the classifier's,
the image-pooling branch last, and 48 low-level channels fused as [low-level, ASPP].

Submodule names give UniMatch's checkpoint keys below `decoder.` (`head.b0..b4`, `head.project`,
`reduce`, `fuse`, `classifier`); s4mc/models/weights.py maps UniMatch's `backbone.` to `encoder.`
and its head keys to `decoder.` so its checkpoints load strictly. Which encoder features the
feature-perturbation branch drops is part of the decoder (`perturbed_features`): UniMatch
drops the two it reads, layer1 first, then layer4.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(cin: int, cout: int, k: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ImagePooling(nn.Module):
    """ASPP's image-level branch: global average, 1x1 conv/BN/ReLU, back to the input's size."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        # Index 0 is the pooling, so the conv and BN sit at gap.1 / gap.2 as in UniMatch's keys.
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(in_planes, out_planes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.gap(x), size=x.shape[-2:], mode="bilinear", align_corners=True)


class UniMatchASPP(nn.Module):
    """Branches b0 (1x1), b1-b3 (3x3 at the three rates), b4 (image pooling), concatenated in that
    order, then a 1x1 projection to `out_planes`."""

    def __init__(self, in_planes: int, out_planes: int, dilations: Sequence[int]) -> None:
        super().__init__()
        if len(dilations) != 3:
            raise ValueError(f"ASPP takes 3 dilations, got {list(dilations)}")
        self.b0 = _conv_bn_relu(in_planes, out_planes, 1)
        self.b1 = _conv_bn_relu(in_planes, out_planes, 3, dilations[0])
        self.b2 = _conv_bn_relu(in_planes, out_planes, 3, dilations[1])
        self.b3 = _conv_bn_relu(in_planes, out_planes, 3, dilations[2])
        self.b4 = ImagePooling(in_planes, out_planes)
        self.project = _conv_bn_relu(5 * out_planes, out_planes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1))


class UniMatchDeepLabV3PlusDecoder(nn.Module):
    """UniMatch's DeepLabv3+ head, returning ``{"pred": logits at layer1's resolution}``.

    Args:
        in_planes: channels of the encoder's last stage (2048 for ResNet-50/101).
        num_classes: output classes.
        low_planes: channels of the encoder's layer1 output (256 for ResNet-50/101).
        inner_planes: ASPP and fuse width (256 in UniMatch).
        low_conv_planes: channels of the reduced low-level features (48 in UniMatch).
        dilations: the three ASPP rates (6, 12, 18 at UniMatch's output stride 16).
        rep_head: must be false: UniMatch's decoder has no representation head (the config's
            `net.decoder.kwargs` defaults are the U2PL decoder's, so a config names UniMatch's
            values, as experiments/pascal_unimatch do).
    """

    # Encoder outputs (layer1, layer4) that the FP branch drops, in the order their masks are drawn.
    perturbed_features = (0, 3)

    def __init__(self, in_planes: int, num_classes: int, *, low_planes: int = 256, inner_planes: int = 256,
                 low_conv_planes: int = 48, dilations: Sequence[int] = (6, 12, 18), rep_head: bool = False) -> None:
        super().__init__()
        if rep_head:
            raise ValueError("UniMatch's DeepLabv3+ has no representation head: set net.decoder.kwargs.rep_head: false")
        self.head = UniMatchASPP(in_planes, inner_planes, dilations)
        self.reduce = _conv_bn_relu(low_planes, low_conv_planes, 1)
        self.fuse = nn.Sequential(*_conv_bn_relu(low_conv_planes + inner_planes, inner_planes, 3),
                                  *_conv_bn_relu(inner_planes, inner_planes, 3))
        self.classifier = nn.Conv2d(inner_planes, num_classes, 1, bias=True)

    def forward(self, feats: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        c1, c4 = feats[0], feats[-1]
        high = F.interpolate(self.head(c4), size=c1.shape[-2:], mode="bilinear", align_corners=True)
        # Low-level channels first: the order is part of the checkpoint (fuse.0's input channels).
        return {"pred": self.classifier(self.fuse(torch.cat([self.reduce(c1), high], dim=1)))}
