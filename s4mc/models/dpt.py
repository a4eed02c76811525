"""The DPT head over four ViT layers, and the ViT + DPT segmentation model (UniMatch V2).

Layout and arithmetic follow the facts of docs/method.md ("UniMatch V2") and the golden data
(tests/data/unimatch_v2/): 1×1 projections to `out_channels`, resize layers ConvTranspose(4, 4),
ConvTranspose(2, 2), identity and Conv(3, stride 2), bias-free 3×3 `layerN_rn` convs, four fusion
blocks (residual conv units, bilinear ×2 upsampling with align_corners=True, then a 1×1 conv),
and conv3×3 → ReLU → conv1×1 at 8× the patch grid. The model upsamples that to the padded input
(align_corners=True) and crops the padding off.

Complementary Dropout (UniMatch V2) is the model's `comp_drop=(start, stop)`: the images
start..stop-1 are two halves (strong view 1, strong view 2) and their encoder features are
multiplied channel-wise by m (Bernoulli(0.5)·2) and its complement 2 − m, with half of the
pairs left undropped.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .deeplabv3plus import SegmentationModel
from .vit import padded_size


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FusionBlock(nn.Module):
    """`resConfUnit1` refines the skip input, which is added; `resConfUnit2` follows; then bilinear
    upsampling (to `size`, or ×2) and the 1×1 `out_conv`."""

    def __init__(self, features: int):
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, size=None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        resize = {"size": tuple(size)} if size is not None else {"scale_factor": 2}
        return self.out_conv(F.interpolate(x, **resize, mode="bilinear", align_corners=True))


class Scratch(nn.Module):
    def __init__(self, out_channels: Sequence[int], features: int, num_classes: int):
        super().__init__()
        for i, c in enumerate(out_channels, start=1):
            setattr(self, f"layer{i}_rn", nn.Conv2d(c, features, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self, f"refinenet{i}", FusionBlock(features))
        self.output_conv = nn.Sequential(nn.Conv2d(features, features, 3, padding=1), nn.ReLU(inplace=True),
                                         nn.Conv2d(features, num_classes, 1))


class DPTHead(nn.Module):
    """`forward(feats)`: four maps [B, in_channels, h, w] → logits [B, num_classes, 8h, 8w]."""

    def __init__(self, in_channels: int, num_classes: int, *, features: int, out_channels: Sequence[int]):
        super().__init__()
        if len(out_channels) != 4:
            raise ValueError(f"the DPT head takes 4 out_channels, got {list(out_channels)}")
        c = list(out_channels)
        self.projects = nn.ModuleList(nn.Conv2d(in_channels, oc, 1) for oc in c)
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(c[0], c[0], 4, stride=4),
            nn.ConvTranspose2d(c[1], c[1], 2, stride=2),
            nn.Identity(),
            nn.Conv2d(c[3], c[3], 3, stride=2, padding=1),
        ])
        self.scratch = Scratch(c, features, num_classes)
        # The deepest fusion block has no skip input, so its first unit exists (checkpoint layout)
        # but is never used: frozen, it gets no gradient and no weight decay, as in UniMatch V2.
        self.scratch.refinenet4.resConfUnit1.requires_grad_(False)

    def forward(self, feats: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        s = self.scratch
        l1, l2, l3, l4 = (rn(resize(project(f))) for f, project, resize, rn in zip(
            feats, self.projects, self.resize_layers, (s.layer1_rn, s.layer2_rn, s.layer3_rn, s.layer4_rn)))
        path = s.refinenet4(l4, size=l3.shape[-2:])
        path = s.refinenet3(path, l3, size=l2.shape[-2:])
        path = s.refinenet2(path, l2, size=l1.shape[-2:])
        path = s.refinenet1(path, l1)
        return {"pred": s.output_conv(path)}


def draw_comp_drop_mask(pairs: int, channels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Complementary Dropout's channel mask [2·pairs, channels]: rows 0..pairs-1 (view 1) hold
    m = 2·Bernoulli(0.5), rows pairs.. (view 2) hold 2 − m, and int(pairs/2) pairs chosen by a
    permutation hold 1 in both. Drawn on the CPU in UniMatch V2's order (the Bernoulli sample,
    then the permutation), so a generator seeded as its global RNG replays its draws."""
    m1 = torch.binomial(torch.ones(pairs, channels), torch.full((pairs, channels), 0.5), generator=generator) * 2.0
    m2 = 2.0 - m1
    kept = torch.randperm(pairs, generator=generator)[:int(pairs * 0.5)]
    m1[kept] = 1.0
    m2[kept] = 1.0
    return torch.cat([m1, m2])


class ViTSegmentationModel(SegmentationModel):
    """A DINOv2 encoder + DPT decoder; `forward(x) -> {"pred"}` at the input's size.

    Inputs of any size: they are padded (bottom/right, with 0, the mean colour in normalised
    space) to multiples of 14 and the prediction is cropped back. `comp_drop=(start, stop)`
    applies Complementary Dropout to images start..stop-1 (an even count: view 1 then view 2),
    with `comp_drop_mask` (rows for those images) or a mask drawn from `generator`.
    `perturb`/`dropout` (UniMatch V1's feature perturbation) work as in SegmentationModel.
    """

    def forward(self, x: torch.Tensor, perturb: tuple[int, int] | None = None, dropout: float = 0.5, *,
                comp_drop: tuple[int, int] | None = None, comp_drop_mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        ph, pw = padded_size(height, width)
        if (ph, pw) != (height, width):
            x = F.pad(x, (0, pw - width, 0, ph - height))
        if comp_drop is None:
            out = super().forward(x, perturb, dropout)
        else:
            if perturb is not None:
                raise ValueError("comp_drop and perturb are two feature perturbations; use one")
            out = self.decoder(self._comp_drop(self.encoder(x), comp_drop, comp_drop_mask, generator))
        # The head works at 8× the patch grid; the release resizes to the grid × 14 with align_corners=True.
        out = {k: F.interpolate(v, size=(ph, pw), mode="bilinear", align_corners=True)[..., :height, :width]
               for k, v in out.items()}
        return out

    @staticmethod
    def _comp_drop(feats, span, mask, generator) -> list[torch.Tensor]:
        start, stop = span
        n, channels = stop - start, feats[0].shape[1]
        if n <= 0 or n % 2:
            raise ValueError(f"comp_drop=({start}, {stop}) must span an even number of images (two views)")
        if mask is None:
            mask = draw_comp_drop_mask(n // 2, channels, generator)
        if tuple(mask.shape) != (n, channels):
            raise ValueError(f"comp_drop_mask has shape {tuple(mask.shape)}, expected {(n, channels)}")
        full = torch.ones(feats[0].shape[0], channels, dtype=feats[0].dtype, device=feats[0].device)
        full[start:stop] = mask.to(full)
        # One mask for all four levels, broadcast over the tokens (UniMatch V2's comp_drop).
        return [f * full[:, :, None, None] for f in feats]

