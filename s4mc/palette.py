"""Colour palettes and saving predicted label maps as images.

Predictions are saved as palette ("P" mode) PNGs: the pixel values stay the class
indices, so a saved file can be read back as a label map (and scored again), while
any image viewer shows the colours. An optional overlay PNG blends the colours onto
the input image for a quick visual check.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .errors import DataError

__all__ = [
    "voc_palette",
    "cityscapes_palette",
    "generate_palette",
    "as_palette",
    "save_prediction",
]


def voc_palette() -> np.ndarray:
    """The standard PASCAL VOC colour map: uint8 [256, 3].

    Entry i spreads the bits of i over the three channels, three bits at a time,
    starting from the most significant bit of each channel (bit 0 of i -> red bit 7,
    bit 1 -> green bit 7, bit 2 -> blue bit 7, bit 3 -> red bit 6, ...). Index 255
    (the VOC "void" border) comes out as (224, 224, 192).
    """
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        r = g = b = 0
        c = i
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        pal[i] = (r, g, b)
    return pal


# The 19 Cityscapes training classes' official colours (road ... bicycle), in
# train-id order.
_CITYSCAPES_COLOURS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)


def cityscapes_palette() -> np.ndarray:
    """The 19 standard Cityscapes train-id colours: uint8 [19, 3]."""
    return np.array(_CITYSCAPES_COLOURS, dtype=np.uint8)


def generate_palette(n: int) -> np.ndarray:
    """A deterministic palette of n distinct colours for custom data: uint8 [n, 3].

    Uses the VOC bit-interleave scheme, whose first 256 entries are pairwise
    distinct, so class 0 is black (a usual background colour) and the same class
    index always gets the same colour across runs. A PNG palette holds at most 256
    entries, hence the limit.
    """
    if not isinstance(n, int) or n < 1 or n > 256:
        raise ValueError(f"generate_palette: n must be an int in [1, 256], got {n!r}")
    return voc_palette()[:n].copy()


def as_palette(palette: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """Validate a palette given as a list of [r, g, b] or an array; returns uint8 [n, 3]."""
    arr = np.asarray(palette)
    if arr.ndim != 2 or arr.shape[1] != 3 or arr.shape[0] < 1 or arr.shape[0] > 256:
        raise DataError(f"palette must be a list of 1..256 [r, g, b] entries, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise DataError(f"palette values must lie in 0..255, got min {arr.min()} max {arr.max()}")
    return arr.astype(np.uint8)


def _to_index_map(pred) -> np.ndarray:
    if hasattr(pred, "detach"):
        pred = pred.detach().cpu().numpy()
    pred = np.asarray(pred)
    if pred.ndim != 2:
        raise DataError(f"save_prediction expects a label map [H, W], got shape {pred.shape}")
    if pred.size and (pred.min() < 0 or pred.max() > 255):
        # A "P" PNG stores one byte per pixel; larger indices would silently wrap.
        raise DataError(
            f"save_prediction: label values must lie in 0..255 for a palette PNG, "
            f"got min {pred.min()} max {pred.max()}"
        )
    return pred.astype(np.uint8)


def _overlay_path(path: Path) -> Path:
    return path.with_name(path.stem + "_overlay.png")


def save_prediction(
    path: str | os.PathLike,
    pred_hw_uint8,
    palette: Sequence[Sequence[int]] | np.ndarray,
    image=None,
    overlay_alpha: float = 0.5,
    overlay_path: str | os.PathLike | None = None,
) -> list[Path]:
    """Write a prediction as a palette PNG, and optionally a colour overlay.

    path: the label PNG ("P" mode; pixel values are the class indices, so
        ``np.array(Image.open(path))`` gives the prediction back).
    pred_hw_uint8: label map [H, W] (numpy or tensor), values in 0..255.
    palette: [n, 3] colours; indices past n are drawn black (PIL pads with zeros).
    image: optional uint8 [H, W, 3] array or PIL image of the
        same size; when given, ``<stem>_overlay.png`` (or overlay_path) is written
        as (1 - alpha) * image + alpha * colour.
    Returns the paths written. Parent folders are created.
    """
    path = Path(path)
    pred = _to_index_map(pred_hw_uint8)
    pal = as_palette(palette)
    path.parent.mkdir(parents=True, exist_ok=True)

    # An "L" image turns into "P" in place on putpalette, keeping the byte values
    # (convert("P") would re-quantise them). PIL wants a flat list of 768 values;
    # the unused tail is black.
    out = Image.fromarray(pred)
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: len(pal)] = pal
    out.putpalette(flat.reshape(-1).tolist())
    out.save(path, format="PNG")
    written = [path]

    if image is not None:
        if not 0.0 <= float(overlay_alpha) <= 1.0:
            raise ValueError(f"overlay_alpha must lie in [0, 1], got {overlay_alpha}")
        img = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
        if img.shape != pred.shape + (3,):
            raise DataError(
                f"save_prediction: overlay image shape {img.shape} does not match "
                f"prediction {pred.shape} (+3 channels) for {path}"
            )
        colour = flat[pred].astype(np.float32)
        blend = (1.0 - overlay_alpha) * img.astype(np.float32) + overlay_alpha * colour
        ov_path = Path(overlay_path) if overlay_path is not None else _overlay_path(path)
        ov_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(np.rint(blend), 0, 255).astype(np.uint8)).save(ov_path, format="PNG")
        written.append(ov_path)
    return written
