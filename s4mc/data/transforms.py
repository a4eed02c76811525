"""Joint image/label transforms.

Geometry runs on uint8 numpy arrays with cv2 (resize is the costliest step at crop
513 and cv2's is several times faster than PIL's); the image is normalised only after
cropping, so padding can be exactly 0 in normalised space (the mean colour), as the
release did, and the label is padded with `pad_label` (255 = ignore, or 0 for the
release's centre-crop evaluation protocol). Labels always resize with nearest
neighbour: interpolating class indices would invent classes at boundaries.

Randomness comes from torch's global generator, which the DataLoader seeds per worker
(base seed from the loader's rank-dependent generator + worker id), so every rank and
worker draws different crops while a run stays reproducible from its seed.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch

DEFAULT_MEAN = (123.675, 116.28, 103.53)
DEFAULT_STD = (58.395, 57.12, 57.375)


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


def _randint(hi_inclusive: int) -> int:
    return int(torch.randint(0, hi_inclusive + 1, ())) if hi_inclusive > 0 else 0


class Normalize:
    """uint8 HxWx3 RGB -> float32 3xHxW, (x - mean) / std with mean/std on the 0-255 scale."""

    def __init__(self, mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return (image.float() - self.mean) / self.std


class StrongPhotometric:
    """The student's photometric strong view (S4MC psi / FixMatch style): colour
    jitter (brightness, contrast, saturation, hue in random order, as torchvision's
    ColorJitter) with probability p, random grayscale, Gaussian blur. Geometry-free, so
    the strong view stays pixel-aligned with the weak one and its pseudo-label.

    Written with cv2 on uint8 HxWx3 arrays rather than torchvision.transforms.v2: at
    crop 513 torchvision's hue adjustment and separable blur cost ~15 ms each per image
    in a single-threaded worker, cv2's about 1 ms, and this view is built for every
    unlabeled image.
    """

    def __init__(self, color_jitter=(0.5, 0.5, 0.5, 0.25), jitter_prob=0.8, grayscale_prob=0.2,
                 blur_prob=0.5, blur_sigma=(0.1, 2.0)):
        b, c, s, h = (float(v) for v in color_jitter)
        self.ranges = [(max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h)]
        self.jitter_prob = float(jitter_prob)
        self.grayscale_prob = float(grayscale_prob)
        self.blur_prob = float(blur_prob)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))

    @classmethod
    def from_cfg(cls, cfg: dict | None) -> "StrongPhotometric":
        cfg = dict(cfg or {})
        return cls(**{k: v for k, v in cfg.items()
                      if k in ("color_jitter", "jitter_prob", "grayscale_prob", "blur_prob", "blur_sigma")})

    @staticmethod
    def _gray(img: np.ndarray) -> np.ndarray:
        return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)

    def _jitter(self, img: np.ndarray) -> np.ndarray:
        for op in torch.randperm(4).tolist():
            lo, hi = self.ranges[op]
            if hi - lo <= 0 and op != 3:
                continue
            f = _uniform(lo, hi)
            if op == 0:    # brightness: scale towards black
                img = cv2.addWeighted(img, f, img, 0.0, 0.0)
            elif op == 1:  # contrast: blend with the mean grey level
                m = float(self._gray(img).mean())
                img = cv2.addWeighted(img, f, img, 0.0, m * (1 - f))
            elif op == 2:  # saturation: blend with the per-pixel grey image
                g = cv2.cvtColor(self._gray(img), cv2.COLOR_GRAY2RGB)
                img = cv2.addWeighted(img, f, g, 1 - f, 0.0)
            elif f != 0.0:  # hue: rotate H (full 0-255 range in the *_FULL conversions)
                hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)
                hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(f * 256))).astype(np.uint8)
                img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)
        return img

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 RGB -> uint8 HxWx3 RGB (a new array)."""
        image = np.ascontiguousarray(image)
        if float(torch.rand(())) < self.jitter_prob:
            image = self._jitter(image)
        if float(torch.rand(())) < self.grayscale_prob:
            image = cv2.cvtColor(self._gray(image), cv2.COLOR_GRAY2RGB)
        if float(torch.rand(())) < self.blur_prob:
            # ksize (0, 0): cv2 picks an odd kernel covering about +-3 sigma
            image = cv2.GaussianBlur(image, (0, 0), _uniform(*self.blur_sigma))
        return image


def resize_pair(image: np.ndarray, label: np.ndarray, height: int, width: int):
    # INTER_NEAREST_EXACT samples at pixel centres like INTER_LINEAR does; plain
    # INTER_NEAREST floors (dst * scale) and shifts the label by up to half a source
    # pixel against the image at non-integer scales.
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
    return image, label


def pad_to(image: torch.Tensor, label: torch.Tensor, height: int, width: int, pad_label: int,
           *, center: bool = False):
    """Pad a normalised image (with 0) and its label (with pad_label) to at least HxW."""
    h, w = label.shape[-2:]
    if h >= height and w >= width:
        return image, label
    H, W = max(h, height), max(w, width)
    top = (H - h) // 2 if center else 0
    left = (W - w) // 2 if center else 0
    img = image.new_zeros((image.shape[0], H, W))
    img[:, top:top + h, left:left + w] = image
    lab = label.new_full((H, W), pad_label)
    lab[top:top + h, left:left + w] = label
    return img, lab


def center_crop(image: torch.Tensor, label: torch.Tensor, size: Sequence[int], pad_label: int = 255):
    """Centre crop of a normalised image and its label to `size` (H, W), padding first
    when the image is smaller (image 0, label pad_label; U2PL's VOC in-training protocol
    used pad_label=0)."""
    ch, cw = int(size[0]), int(size[1])
    image, label = pad_to(image, label, ch, cw, pad_label, center=True)
    h, w = label.shape[-2:]
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[..., top:top + ch, left:left + cw], label[top:top + ch, left:left + cw]


class TrainTransform:
    """Random rescale in [a, b] -> random crop (pad when smaller) -> horizontal flip ->
    normalise; optionally a photometric strong view with the same geometry.

    Returns {"image": float[3,ch,cw], "label": long[ch,cw]} (+ "image_strong", and "image_strong_2"
    with `strong_views=2`: two independent draws of the strong augmentation, as UniMatch uses;
    + "padding", bool[ch,cw] true on the padded border, with `padding_mask=True`).
    """

    def __init__(self, *, crop_size: Sequence[int] | None, scale_range: Sequence[float] | None = (0.5, 2.0),
                 flip: bool = True, mean=DEFAULT_MEAN, std=DEFAULT_STD, pad_label: int = 255,
                 strong: StrongPhotometric | None = None, strong_views: int = 1, padding_mask: bool = False):
        self.crop = None if crop_size is None else (int(crop_size[0]), int(crop_size[1]))
        self.scale_range = None if scale_range is None else (float(scale_range[0]), float(scale_range[1]))
        self.flip = bool(flip)
        self.normalize = Normalize(mean, std)
        self.pad_label = int(pad_label)
        self.strong = strong
        self.strong_views = strong_views
        self.padding_mask = padding_mask

    def geometry(self, image: np.ndarray, label: np.ndarray):
        """The random geometric part, on uint8 arrays; returns the (unpadded) crop."""
        h, w = label.shape
        if self.scale_range is not None:
            s = _uniform(*self.scale_range)
            nh, nw = max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))
            if (nh, nw) != (h, w):
                image, label = resize_pair(image, label, nh, nw)
            h, w = nh, nw
        if self.crop is not None:
            ch, cw = self.crop
            top, left = _randint(h - ch), _randint(w - cw)
            image = image[top:top + ch, left:left + cw]
            label = label[top:top + ch, left:left + cw]
        if self.flip and float(torch.rand(())) < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        return np.ascontiguousarray(image), np.ascontiguousarray(label)

    def _to_canvas(self, image: np.ndarray, H: int, W: int) -> torch.Tensor:
        # normalise straight into a zero canvas: one allocation, and the padding is
        # exactly 0 in normalised space
        h, w = image.shape[:2]
        out = torch.zeros((3, H, W), dtype=torch.float32)
        view = out[:, :h, :w]
        view.copy_(torch.from_numpy(image).permute(2, 0, 1))
        view.sub_(self.normalize.mean).div_(self.normalize.std)
        return out

    def __call__(self, image: np.ndarray, label: np.ndarray) -> dict:
        image, label = self.geometry(image, label)
        h, w = label.shape
        H, W = (max(h, self.crop[0]), max(w, self.crop[1])) if self.crop is not None else (h, w)
        lab = torch.full((H, W), self.pad_label, dtype=torch.int64)
        # uint16 masks (custom datasets) have no torch copy kernel; widen them first
        lab[:h, :w] = torch.from_numpy(label if label.dtype == np.uint8 else label.astype(np.int64))
        out = {"image": self._to_canvas(image, H, W), "label": lab}
        if self.strong is not None:
            out["image_strong"] = self._to_canvas(self.strong(image), H, W)
            if self.strong_views == 2:
                out["image_strong_2"] = self._to_canvas(self.strong(image), H, W)
        if self.padding_mask:
            # The label's pad value may also mark real pixels (255 on object boundaries), so the
            # padded border gets its own mask (UniMatch's ignore_mask).
            out["padding"] = torch.ones((H, W), dtype=torch.bool)
            out["padding"][:h, :w] = False
        return out


class EvalTransform:
    """Full image, normalised; no resize, no crop (evaluation decides how to tile)."""

    def __init__(self, mean=DEFAULT_MEAN, std=DEFAULT_STD):
        self.normalize = Normalize(mean, std)

    def __call__(self, image: np.ndarray, label: np.ndarray) -> dict:
        return {"image": self.normalize(image), "label": torch.from_numpy(label.astype(np.int64))}
