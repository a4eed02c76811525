"""Xception-65 encoder in UniMatch's checkpoint layout (`net.encoder.type: xception65`, the COCO rows).

Module names and shapes follow UniMatch's `model/backbone/xception.py`, so that UniMatch's ImageNet
`xception.pth` loads strictly: `conv1`/`bn1` (3->32, stride 2), `conv2`/`bn2` (32->64), `block1` ..
`block20`, `conv3` .. `conv5`. A block holds `skip`/`skipbn` (a strided 1x1 projection, only where the
shape changes: blocks 1, 2, 3 and 20) and `sepconv1..3`; every separable conv holds `depthwise`, `bn1`,
`pointwise`, `bn2`. tests/data/xception65_keys.json lists every key and shape (and where they come from).

    entry   block1 64->128 /2, block2 128->256 /2, block3 256->728 /2 (OS 16) or /1 (OS 8)
    middle  block4..block19, 728->728, dilation 16/OS on every separable conv
    exit    block20 728->728->1024->1024 (stride 1), conv3 1024->1536, conv4 1536->1536, conv5 1536->2048

The encoder returns (c1, c4): c1 is block2's second separable conv (256 channels at stride 4, taken
before block2's strided third conv, without a ReLU), c4 is conv5's output (2048 channels at stride 16
or 8). `out_channels` gives both, so the DeepLabv3+ decoder is built for them (registry.build_model).

Behaviours of UniMatch's network kept on purpose, because UniMatch's COCO numbers were trained with them:
- BatchNorm momentum 0.0003 (PyTorch's convention: the running statistics move by 0.03% a step, so
  they stay close to the ImageNet ones);
- the identity blocks (4..19) apply their first ReLU in place to the tensor the residual also reads,
  so their shortcut carries relu(x), not x (written out here as such);
- the blocks' separable convs are pre-activated (ReLU, depthwise, BN, pointwise, BN); conv3..conv5 are
  post-activated (depthwise, BN, ReLU, pointwise, BN, ReLU).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

BN_MOMENTUM = 0.0003  # UniMatch's bn_mom for every BatchNorm of its Xception
MIDDLE_BLOCKS = 16  # block4 .. block19: the "65" of Xception-65 with the entry and exit flows

PRETRAINED_HINT = (
    "UniMatch's README (https://github.com/LiheYoung/UniMatch#pretrained-backbone) links the ImageNet "
    "Xception-65 weights (xception.pth); download them and set net.encoder.pretrained to their path."
)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)


class SeparableConv2d(nn.Module):
    """Depthwise 3x3 (carrying stride and dilation) + BN, then pointwise 1x1 + BN.

    preact: ReLU before the depthwise conv and none after (the blocks); otherwise a ReLU after each
    BN (conv3..conv5).
    """

    def __init__(self, cin: int, cout: int, *, stride: int = 1, dilation: int = 1, preact: bool = True) -> None:
        super().__init__()
        self.preact = preact
        self.depthwise = nn.Conv2d(cin, cin, 3, stride=stride, padding=dilation, dilation=dilation, groups=cin,
                                   bias=False)
        self.bn1 = _bn(cin)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = _bn(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            return self.bn2(self.pointwise(self.bn1(self.depthwise(F.relu(x)))))
        x = F.relu(self.bn1(self.depthwise(x)))
        return F.relu(self.bn2(self.pointwise(x)))


class Block(nn.Module):
    """Three pre-activated separable convs (the last one strided) plus a shortcut.

    grow_first: the first conv changes the width (cin -> cout), else the second does.
    """

    def __init__(self, cin: int, cout: int, *, stride: int = 1, dilation: int = 1, grow_first: bool = True) -> None:
        super().__init__()
        if cin != cout or stride != 1:
            self.skip = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            self.skipbn = _bn(cout)
        else:
            self.skip = None
        mid = cout if grow_first else cin
        self.sepconv1 = SeparableConv2d(cin, mid, dilation=dilation)
        self.sepconv2 = SeparableConv2d(mid, cout, dilation=dilation)
        self.sepconv3 = SeparableConv2d(cout, cout, stride=stride, dilation=dilation)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, the second conv's output: block2's is the decoder's low-level feature c1)."""
        # Identity blocks: relu(x) as the shortcut (module doc: UniMatch's in-place ReLU).
        shortcut = F.relu(x) if self.skip is None else self.skipbn(self.skip(x))
        low = self.sepconv2(self.sepconv1(x))
        return self.sepconv3(low) + shortcut, low


class Xception65(nn.Module):
    """Xception-65 backbone returning (c1, c4); see the module doc.

    Args:
        output_stride: 16 (block3 strided, dilation 1 after it) or 8 (block3 not strided, dilation 2).
        width: conv2's channel count, 64 for the real network; every width scales with it (tests and
            toy runs use small ones; only 64 matches the ImageNet weights).
    """

    def __init__(self, *, output_stride: int = 16, width: int = 64) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"xception65 supports output stride 16 or 8, got {output_stride}")
        if width < 2 or width % 2:
            raise ValueError(f"xception65 width must be an even number >= 2, got {width}")
        w = int(width)
        middle = round(728 * w / 64)
        rate = 16 // output_stride
        self.output_stride = output_stride
        self.conv1 = nn.Conv2d(3, w // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = _bn(w // 2)
        self.conv2 = nn.Conv2d(w // 2, w, 3, padding=1, bias=False)
        self.bn2 = _bn(w)
        self.block1 = Block(w, 2 * w, stride=2)
        self.block2 = Block(2 * w, 4 * w, stride=2)
        self.block3 = Block(4 * w, middle, stride=2 if output_stride == 16 else 1)
        for i in range(4, 4 + MIDDLE_BLOCKS):
            setattr(self, f"block{i}", Block(middle, middle, dilation=rate))
        self.block20 = Block(middle, 16 * w, dilation=rate, grow_first=False)
        self.conv3 = SeparableConv2d(16 * w, 24 * w, dilation=rate, preact=False)
        self.conv4 = SeparableConv2d(24 * w, 24 * w, dilation=rate, preact=False)
        self.conv5 = SeparableConv2d(24 * w, 32 * w, dilation=rate, preact=False)
        #: channels of (c1, c4); the decoder reads these.
        self.out_channels = (4 * w, 32 * w)
        self.weights_hint = PRETRAINED_HINT
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # N(0, 2 / (k*k*out_channels)), UniMatch's init; fan_out counts exactly that.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x, _ = self.block1(x)
        x, c1 = self.block2(x)
        for i in range(3, 21):
            x, _ = getattr(self, f"block{i}")(x)
        return c1, self.conv5(self.conv4(self.conv3(x)))

    def adapt_pretrained(self, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """UniMatch's `xception.pth` as a state dict for this module (weights.load_backbone calls it).

        UniMatch drops every key containing "itr", "tmp" or "track" before loading (no key of the
        network contains the first two; "track" is BatchNorm's num_batches_tracked, which the file
        need not carry); the counters then start from the model's own. Everything else must match.
        """
        own = self.state_dict()
        out = {k: v for k, v in sd.items() if not any(s in k for s in ("itr", "tmp", "track"))}
        out.update({k: v for k, v in own.items() if k.endswith("num_batches_tracked")})
        return out


def _output_stride(flags: Sequence[bool]) -> int:
    """The ResNet-style `replace_stride_with_dilation` flags read as the Xception's output stride."""
    flags = [bool(f) for f in flags]
    if len(flags) == 3 and not flags[0] and flags[2]:
        return 8 if flags[1] else 16
    raise ValueError(
        f"net.encoder.kwargs.replace_stride_with_dilation = {flags}: xception65 supports output stride 16 "
        "([false, false, true]) or 8 ([false, true, true])")


def xception65(*, replace_stride_with_dilation: Sequence[bool] = (False, False, True), width: int = 64,
               stem: str = "deep", multi_grid: bool = False, zero_init_residual: bool = False,
               fpn: bool = True, ceil_mode: bool | None = None) -> Xception65:
    """Xception-65 for `net.encoder.type: xception65`.

    The config schema hands every encoder the same `net.encoder.kwargs`: the output stride is read from
    `replace_stride_with_dilation` as for a ResNet ([false, false, true] = 16, [false, true, true] = 8);
    `multi_grid`, `zero_init_residual` and `fpn` are ResNet settings the Xception has no counterpart
    for, and are ignored. `stem` must stay `deep` (the default): the Xception has one stem only, and
    no max-pool, so `ceil_mode` must stay null.
    """
    if ceil_mode is not None:
        raise ValueError(f"net.encoder.kwargs.ceil_mode = {ceil_mode!r}: xception65 has no max-pool; leave it null")
    if stem != "deep":
        raise ValueError(f"net.encoder.stem = {stem!r}: xception65 has a single stem; leave net.encoder.stem at deep")
    return Xception65(output_stride=_output_stride(replace_stride_with_dilation), width=width)
