"""The DINOv2 vision transformer, in the official checkpoints' layout (UniMatch V2's encoder).

Written from the facts in docs/method.md ("UniMatch V2") and the golden data of
tests/data/unimatch_v2/: pre-norm blocks with LayerScale on both branches, exact-erf GELU,
LayerNorm eps 1e-6, a 37×37 position-embedding grid (518 px at patch 14) resized bicubically
for other inputs, and intermediate layers passed through the final norm with the class token
dropped. Module names are the state-dict keys of the official `dinov2_vit{s,b,l}14_pretrain.pth`
files (cls_token, pos_embed, mask_token, patch_embed.proj, blocks.{i}.{norm1, attn.qkv,
attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}, norm), so those load strictly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PATCH = 14
NATIVE_GRID = 37  # the position embeddings' grid: 518 / 14
# DINOv2 resizes its position embeddings by a scale factor of (grid + 0.1) / 37 rather than to a
# size, so that the rounding of the factor cannot lose a row (docs/method.md, "UniMatch V2").
INTERPOLATE_OFFSET = 0.1

DINOV2_WEIGHTS_HINT = (
    "UniMatch V2 starts from the official DINOv2 release checkpoints (github.com/facebookresearch/dinov2): "
    "dinov2_vits14_pretrain.pth (small), dinov2_vitb14_pretrain.pth (base) or dinov2_vitl14_pretrain.pth "
    "(large), at https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{s,b,l}14/dinov2_vit{s,b,l}14_pretrain.pth. "
    "Download the one for net.encoder.type and set net.encoder.pretrained to its path "
    "(UniMatch V2 keeps them as ./pretrained/dinov2_<size>.pth)."
)


@dataclass(frozen=True)
class ViTSize:
    embed_dim: int
    depth: int
    num_heads: int
    layers: tuple[int, ...]  # blocks whose outputs the DPT head reads (0-based)
    dpt_features: int
    dpt_out_channels: tuple[int, int, int, int]


# The DINOv2 sizes with the DPT widths UniMatch V2 pairs them with; `tiny` is the reduced model of
# the golden data (tests/data/unimatch_v2/README.md), for the toy and the tests. It has no
# pretrained weights anywhere.
SIZES = {
    "small": ViTSize(384, 12, 6, (2, 5, 8, 11), 64, (48, 96, 192, 384)),
    "base": ViTSize(768, 12, 12, (2, 5, 8, 11), 128, (96, 192, 384, 768)),
    "large": ViTSize(1024, 24, 16, (4, 11, 17, 23), 256, (256, 512, 1024, 1024)),
    "tiny": ViTSize(32, 4, 2, (0, 1, 2, 3), 8, (4, 8, 16, 32)),
}


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH, stride=PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, h·w, C], row-major over the patch grid


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # qkv's output rows are [q | k | v], each split into heads contiguously.
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """`forward(x)` returns the outputs of the blocks in `layers`, each through the final norm,
    without the class token, as maps [B, C, H/14, W/14]. H and W must be multiples of 14
    (the segmentation model pads to them)."""

    def __init__(self, size: str):
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"unknown ViT size {size!r}; one of {sorted(SIZES)}")
        spec = SIZES[size]
        self.size_name = size
        dim = spec.embed_dim
        self.embed_dim = dim
        self.layers = spec.layers
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, NATIVE_GRID * NATIVE_GRID + 1, dim))
        # Part of the checkpoint layout (DINOv2's masked-image pre-training); segmentation never
        # uses it, so it is frozen: it gets no gradient and no weight decay, as in UniMatch V2
        # where it keeps grad None, and DDP does not wait for it.
        self.mask_token = nn.Parameter(torch.zeros(1, dim), requires_grad=False)
        self.blocks = nn.ModuleList(Block(dim, spec.num_heads) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.out_channels = (dim,) * len(spec.layers)
        self.weights_hint = DINOV2_WEIGHTS_HINT if size != "tiny" else (
            "vit_tiny is the golden data's reduced model; no pretrained weights exist for it")
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """The position embeddings [1, 1 + h·w, C] for an input of height × width pixels."""
        h, w = height // PATCH, width // PATCH
        if h == w == NATIVE_GRID:
            return self.pos_embed
        pos = self.pos_embed.float()  # resized in fp32 whatever the model's dtype
        patch = pos[:, 1:].reshape(1, NATIVE_GRID, NATIVE_GRID, -1).permute(0, 3, 1, 2)
        scale = ((h + INTERPOLATE_OFFSET) / NATIVE_GRID, (w + INTERPOLATE_OFFSET) / NATIVE_GRID)
        patch = F.interpolate(patch, scale_factor=scale, mode="bicubic", align_corners=False, antialias=False)
        if patch.shape[-2:] != (h, w):  # cannot happen for a grid below ~3700 patches; a guard, not a branch
            raise RuntimeError(f"position embeddings resized to {tuple(patch.shape[-2:])}, expected {(h, w)}")
        patch = patch.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([pos[:, :1], patch], dim=1).to(self.pos_embed.dtype)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        b, _, height, width = x.shape
        if height % PATCH or width % PATCH:
            raise ValueError(f"the ViT takes inputs whose sides are multiples of {PATCH}, got {height}x{width}")
        t = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(x)], dim=1)
        return t + self.interpolate_pos_encoding(height, width)

    def get_intermediate_layers(self, x: torch.Tensor, layers=None) -> list[torch.Tensor]:
        """Tokens [B, h·w, C] after each block in `layers`, through the final norm, class token dropped."""
        layers = tuple(self.layers if layers is None else layers)
        t = self.tokens(x)
        out = []
        for i, block in enumerate(self.blocks[:max(layers) + 1]):
            t = block(t)
            if i in layers:
                out.append(self.norm(t)[:, 1:])
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, _, height, width = x.shape
        h, w = height // PATCH, width // PATCH
        return [t.transpose(1, 2).reshape(b, self.embed_dim, h, w) for t in self.get_intermediate_layers(x)]


def dinov2_small() -> DinoVisionTransformer:
    return DinoVisionTransformer("small")


def dinov2_base() -> DinoVisionTransformer:
    return DinoVisionTransformer("base")


def dinov2_large() -> DinoVisionTransformer:
    return DinoVisionTransformer("large")


def vit_tiny() -> DinoVisionTransformer:
    """The golden data's reduced model (C 32, 4 blocks, 2 heads): for the toy and the tests."""
    return DinoVisionTransformer("tiny")


def padded_size(height: int, width: int) -> tuple[int, int]:
    return math.ceil(height / PATCH) * PATCH, math.ceil(width / PATCH) * PATCH
