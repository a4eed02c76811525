"""DeepLabv3+ decoder, auxiliary head and the encoder/decoder/auxor wrapper, in U2PL's layout.

Sequential indices (``classifier.0/1/4/5/8`` etc.) are part of the checkpoint format: they must
stay where they are so that U2PL/S4MC checkpoints load strictly. Channel counts default to the
release (256 everywhere) and shrink through ``inner_planes``/``low_conv_planes`` for toy models.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DROPOUT = 0.1  # the release's Dropout2d rate in head, classifier, representation and aux head


def _conv_bn_relu(cin: int, cout: int, k: int, dilation: int = 1, bias: bool = False) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=bias),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: image pool, 1x1 and three dilated 3x3 branches, concatenated.

    ``conv1`` starts with the pooling layer (index 0) so its conv/BN sit at ``conv1.1``/``conv1.2``
    as in the release checkpoints.
    """

    def __init__(self, in_planes: int, inner_planes: int = 256, dilations: Sequence[int] = (12, 24, 36)) -> None:
        super().__init__()
        if len(dilations) != 3:
            raise ValueError(f"ASPP takes 3 dilations, got {list(dilations)}")
        self.conv1 = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(in_planes, inner_planes, 1))
        self.conv2 = nn.Sequential(*_conv_bn_relu(in_planes, inner_planes, 1))
        self.conv3 = nn.Sequential(*_conv_bn_relu(in_planes, inner_planes, 3, dilations[0]))
        self.conv4 = nn.Sequential(*_conv_bn_relu(in_planes, inner_planes, 3, dilations[1]))
        self.conv5 = nn.Sequential(*_conv_bn_relu(in_planes, inner_planes, 3, dilations[2]))
        self.out_planes = 5 * inner_planes

    def get_outplanes(self) -> int:
        return self.out_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        # Bilinear upsampling of a 1x1 map (align_corners=True) is a constant broadcast; expand
        # gives the identical values without an interpolation kernel.
        pooled = self.conv1(x).expand(-1, -1, h, w)
        return torch.cat([pooled, self.conv2(x), self.conv3(x), self.conv4(x), self.conv5(x)], dim=1)


def _prediction_tail(cin: int, hidden: int, cout: int) -> nn.Sequential:
    # conv(bias)->BN->ReLU->Dropout twice, then a 1x1 conv: indices 0,1,2,3 | 4,5,6,7 | 8.
    return nn.Sequential(
        *_conv_bn_relu(cin, hidden, 3, bias=True),
        nn.Dropout2d(DROPOUT),
        *_conv_bn_relu(hidden, hidden, 3, bias=True),
        nn.Dropout2d(DROPOUT),
        nn.Conv2d(hidden, cout, 1, bias=True),
    )


class DeepLabV3PlusDecoder(nn.Module):
    """DeepLabv3+ decoder returning ``{"pred": logits at layer1 resolution, "rep": features}``.

    Args:
        in_planes: channels of the encoder's last stage (2048 for ResNet-50/101).
        num_classes: output classes.
        low_planes: channels of the encoder's layer1 output (256 for ResNet-50/101).
        inner_planes: ASPP branch width; also the head/classifier/representation width (256).
        low_conv_planes: output channels of the 1x1 projection of the low-level features (256).
        dilations: the three ASPP rates (12, 24, 36 at output stride 8).
        rep_head: build the ``representation`` branch (U2PL's contrastive features).
        rep_planes: channels of ``rep``; default ``inner_planes`` (256 in the release).
    """

    def __init__(
        self,
        in_planes: int,
        num_classes: int,
        *,
        low_planes: int = 256,
        inner_planes: int = 256,
        low_conv_planes: int = 256,
        dilations: Sequence[int] = (12, 24, 36),
        rep_head: bool = True,
        rep_planes: int | None = None,
    ) -> None:
        super().__init__()
        self.low_conv = nn.Sequential(
            nn.Conv2d(low_planes, low_conv_planes, 1, bias=True),
            nn.BatchNorm2d(low_conv_planes),
            nn.ReLU(inplace=True),
        )
        self.aspp = ASPP(in_planes, inner_planes, dilations)
        self.head = nn.Sequential(
            *_conv_bn_relu(self.aspp.get_outplanes(), inner_planes, 3), nn.Dropout2d(DROPOUT)
        )
        fused = low_conv_planes + inner_planes
        self.classifier = _prediction_tail(fused, inner_planes, num_classes)
        self.rep_head = rep_head
        if rep_head:
            self.representation = _prediction_tail(fused, inner_planes, rep_planes or inner_planes)

    def forward(self, feats: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        x1, x4 = feats[0], feats[-1]
        low = self.low_conv(x1)
        high = self.head(self.aspp(x4))
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=True)
        # Order (low, high) is fixed by the release: the classifier's first input channels are
        # the low-level ones, so swapping them would silently break loaded checkpoints.
        fused = torch.cat([low, high], dim=1)
        out = {"pred": self.classifier(fused)}
        if self.rep_head:
            out["rep"] = self.representation(fused)
        return out


class AuxHead(nn.Module):
    """Auxiliary FCN head on layer3 (used on Cityscapes with loss weight 0.4)."""

    def __init__(self, in_planes: int, num_classes: int, inner_planes: int = 256) -> None:
        super().__init__()
        self.aux = nn.Sequential(
            *_conv_bn_relu(in_planes, inner_planes, 3, bias=True),
            nn.Dropout2d(DROPOUT),
            nn.Conv2d(inner_planes, num_classes, 1, bias=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aux(x)


class SegmentationModel(nn.Module):
    """``encoder`` + ``decoder`` (+ ``auxor``); ``forward(x) -> {"pred", "rep"[, "aux"]}``.

    ``pred`` is at 1/4 of the input size; callers upsample it to the label size as the release did.
    ``aux`` (when present) is at layer3's resolution.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, auxor: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        # None registers no submodule, so there are no auxor.* keys, as in the release without aux.
        self.auxor = auxor
        # Recorded FP channel multipliers ([n, C] tensors of 0 and 1/(1-p)) to use instead of drawing,
        # in draw order; tests set it to replay a reference run's dropout (tests/test_unimatch_release.py).
        self.fp_replay: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, perturb: tuple[int, int] | None = None,
                dropout: float = 0.5) -> dict[str, torch.Tensor]:
        """`perturb=(start, stop)` adds UniMatch's feature-perturbation branch: the decoder also
        sees images start..stop-1 with channel dropout on the encoder features, in the same
        batch (one BatchNorm batch, as UniMatch), and returns that prediction as `pred_fp`.
        The decoder's `perturbed_features` names the features dropped (default: every one)."""
        feats = self.encoder(x)
        if perturb is not None:
            start, stop = perturb
            which = getattr(self.decoder, "perturbed_features", range(len(feats)))
            dropped = [self._channel_dropout(f[start:stop], dropout) if i in which else f[start:stop]
                       for i, f in enumerate(feats)]
            both = self.decoder([torch.cat([f, d]) for f, d in zip(feats, dropped)])
            n = x.shape[0]
            out = {key: value[:n] for key, value in both.items()}
            out["pred_fp"] = both["pred"][n:]
        else:
            out = self.decoder(feats)
        if self.auxor is not None:
            out["aux"] = self.auxor(feats[2])
        return out

    def _channel_dropout(self, feature: torch.Tensor, p: float) -> torch.Tensor:
        if self.fp_replay:
            multiplier = self.fp_replay.pop(0).to(feature)
            return feature * multiplier[:, :, None, None]
        # Dropout2d in training mode whatever the module's mode: the perturbation is the point.
        return F.dropout2d(feature, p, training=True)
