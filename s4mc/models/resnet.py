"""Dilated ResNet encoders in U2PL's layout (deep stem, stride on the 3x3, output stride 8).

Module names are chosen so that ``state_dict()`` keys equal those of U2PL's encoder and of its
ImageNet ``resnet101.pth`` key for key (``conv1.0/1/3/4/6``, ``bn1``, ``layerN.i.convK/bnK``,
``layerN.0.downsample.0/1``); with ``stem="torchvision"`` they equal torchvision's ResNet keys
instead (``conv1``, ``bn1``), so both kinds of ImageNet weights load with ``strict=True``.

The encoder returns all four stage outputs ``(layer1, layer2, layer3, layer4)``: the decoder needs
layer1 (low-level features) and layer4, the auxiliary head needs layer3.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

NormLayer = Callable[[int], nn.Module]

# Multi-grid unit rates for layer4 (DeepLabv3). Multiplied by the stage's base dilation they give
# 4, 8, 16 at output stride 8 (base 2 for the first block, 4 for the rest) and 2, 4, 8 at OS16.
MULTI_GRID = (2, 2, 4)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries stride and dilation) -> 1x1 expand, plus identity/projection.

    The stride sits on the 3x3 conv ("ResNet v1.5"), as in U2PL and torchvision; this matters for
    loading their weights, which were trained that way.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        # padding == dilation keeps the spatial size (up to the stride) for a 3x3 kernel.
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Bottleneck ResNet with a deep (U2PL) or 7x7 (torchvision) stem and dilated late stages.

    Args:
        layers: blocks per stage, e.g. ``(3, 4, 23, 3)`` for ResNet-101.
        stem: ``"deep"`` (three 3x3 convs, 128 channels into layer1, ceil-mode max-pool) or
            ``"torchvision"`` (one 7x7 conv, 64 channels, floor-mode max-pool).
        ceil_mode: the stem max-pool's rounding; ``None`` takes the stem's own (above). UniMatch
            builds the deep stem with ``False``, which at even input sizes gives a smaller
            feature grid (docs/method.md, "UniMatch release-exact", item 2).
        replace_stride_with_dilation: for layer2..layer4, trade the stride-2 for dilation.
            ``[False, True, True]`` gives output stride 8 (the release), ``[False, False, True]``
            output stride 16, ``[False, False, False]`` a plain ResNet (stride 32).
        multi_grid: apply the (2, 2, 4) multi-grid rates to layer4's dilations.
        zero_init_residual: start every residual branch's last BN at gamma 0, so each block is
            initially the identity (helps when training from scratch; pretrained weights overwrite it).
        width: base channel count (64 for the standard nets); smaller values make toy models.
        fpn: accepted for release-config compatibility; all four stages are always returned.
    """

    def __init__(
        self,
        layers: Sequence[int],
        *,
        stem: str = "deep",
        replace_stride_with_dilation: Sequence[bool] = (False, True, True),
        multi_grid: bool = True,
        zero_init_residual: bool = False,
        width: int = 64,
        fpn: bool = True,
        norm_layer: NormLayer = nn.BatchNorm2d,
        ceil_mode: bool | None = None,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must list 4 stages, got {list(layers)}")
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation must have 3 booleans (layer2..layer4), "
                f"got {list(replace_stride_with_dilation)}"
            )
        if stem not in ("deep", "torchvision"):
            raise ValueError(f"stem must be 'deep' or 'torchvision', got {stem!r}")
        self.stem_type = stem
        self.fpn = fpn
        width = int(width)

        if stem == "deep":
            # Index layout 0/1/2 | 3/4/5 | 6 gives keys conv1.0, conv1.1, conv1.3, conv1.4, conv1.6;
            # the last conv's BN+ReLU live outside as bn1/relu, as in U2PL's checkpoint.
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
                norm_layer(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, stride=1, padding=1, bias=False),
                norm_layer(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, 2 * width, 3, stride=1, padding=1, bias=False),
            )
            stem_out = 2 * width
            stem_ceil = True  # U2PL pools with ceil_mode; 65 px -> 33 -> 17 (the JSON's 17x17)
        else:
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
            stem_out = width
            stem_ceil = False  # torchvision's pooling, so its weights see what they were trained on
        ceil_mode = stem_ceil if ceil_mode is None else bool(ceil_mode)
        self.bn1 = norm_layer(stem_out)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=ceil_mode)

        self._inplanes = stem_out
        self._dilation = 1
        self._norm = norm_layer
        dil = list(replace_stride_with_dilation)
        self.layer1 = self._make_layer(width, layers[0], stride=1)
        self.layer2 = self._make_layer(2 * width, layers[1], stride=2, dilate=dil[0])
        self.layer3 = self._make_layer(4 * width, layers[2], stride=2, dilate=dil[1])
        self.layer4 = self._make_layer(
            8 * width, layers[3], stride=2, dilate=dil[2], multi_grid=multi_grid
        )
        e = Bottleneck.expansion
        #: channels of (layer1, layer2, layer3, layer4); the decoder and aux head read these.
        self.out_channels = (width * e, 2 * width * e, 4 * width * e, 8 * width * e)
        #: total stride of layer4 relative to the input (8 for the release setting).
        self.output_stride = 4 * (2 if not dil[0] else 1) * (2 if not dil[1] else 1) * (
            2 if not dil[2] else 1
        )

        self._init_weights(zero_init_residual)

    def _make_layer(
        self, planes: int, blocks: int, *, stride: int, dilate: bool = False, multi_grid: bool = False
    ) -> nn.Sequential:
        # The first block of a dilated stage keeps the previous dilation (it sits where the stride
        # used to be); the remaining blocks use the accumulated dilation.
        first_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        grid = MULTI_GRID if multi_grid else (1,) * max(blocks, 1)
        if multi_grid and blocks > len(grid):
            grid = grid + (grid[-1],) * (blocks - len(grid))
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self._inplanes != out:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, out, 1, stride=stride, bias=False), self._norm(out)
            )
        mods = [
            Bottleneck(
                self._inplanes, planes, stride, first_dilation * grid[0], downsample, self._norm
            )
        ]
        self._inplanes = out
        for i in range(1, blocks):
            mods.append(
                Bottleneck(out, planes, 1, self._dilation * grid[i], None, self._norm)
            )
        return nn.Sequential(*mods)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def get_outplanes(self) -> int:
        """Channels of layer4 (the release's name for it)."""
        return self.out_channels[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x1 = self.layer1(x)
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        x4 = self.layer4(x3)
        return x1, x2, x3, x4


def resnet50(**kwargs) -> ResNet:
    """ResNet-50 (3, 4, 6, 3)."""
    return ResNet((3, 4, 6, 3), **kwargs)


def resnet101(**kwargs) -> ResNet:
    """ResNet-101 (3, 4, 23, 3)."""
    return ResNet((3, 4, 23, 3), **kwargs)


def resnet_tiny(*, width: int = 16, layers: Sequence[int] = (1, 1, 1, 1), **kwargs) -> ResNet:
    """A few-block, narrow ResNet for CPU toy runs and tests (same stem layout, same strides).

    With ``width=16`` the stages carry 64/128/256/512 channels and the whole model (with a
    32..64-channel decoder) trains at several iterations per second at ~128 px on two CPU cores.
    """
    return ResNet(tuple(layers), width=width, **kwargs)
