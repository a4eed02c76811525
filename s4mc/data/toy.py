"""A small procedurally generated segmentation dataset for smoke runs and CPU tests.

    python -m s4mc.data.toy --root data/toy --seed 0

Scenes are a textured background with 2-6 overlapping shapes (circle, rectangle,
triangle, blob, ring), drawn back to front so later shapes occlude earlier ones;
the label is the class of the front-most shape at each pixel, so it is spatially
coherent. Colour and texture are strong but imperfect cues: each class uses "its"
colour pool and texture with probability 0.97 (`ToyStyle.class_pref`) and a random one
otherwise, and the background draws from the same pools. Pixel noise, an illumination
gradient and a blur keep the edges from being trivial.

The labeled split is drawn under cleaner conditions (`LABELED`: little noise, even light,
slight blur) than the unlabeled pool and the validation images (`TARGET`), so labels cover
only part of the variation the unlabeled images show: the regime in which self-training has
something to teach (docs/method.md, "The toy study"; benchmarks/toy_shift.py measures what
the shift costs a supervised model). `PRETRAIN` is the style of the separate pretraining pool.
`toy.json` records the generator version and settings; a folder from an older generator is
refused rather than silently mixed with numbers from the current one.

Layout (VOC-like, read by dataset.type "toy"):
    JPEGImages/<id>.png          RGB (PNG so the bytes are identical across libjpeg builds)
    SegmentationClass/<id>.png   palette PNG, index = class
    splits/labeled.txt, splits/unlabeled.txt, splits/val.txt,
    splits/train_all.txt (labeled + unlabeled: the all-labels row, and the toy's unlabeled pool)
    toy.json                     generator version, seed, sizes and styles

Each image comes from its own generator seeded by (seed, split, index), so the
output is deterministic and independent of generation order.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..errors import DataError
from .classes import TOY_CLASSES, TOY_PALETTE

log = logging.getLogger(__name__)

_N_TEXTURES = 5                # flat, stripes, checker, noise, dots
_CLASS_PREF = 0.97             # probability a class uses "its" colour pool / texture


@dataclass(frozen=True)
class ToyStyle:
    """What a generated scene looks like: which shapes are the classes, how strongly colour and
    texture hint at the class, and the shapes' size range (fraction of the image side)."""

    shapes: tuple = ("circle", "rectangle", "triangle", "blob", "ring")
    class_pref: float = _CLASS_PREF
    scale: tuple = (0.15, 0.32)
    objects: tuple = (2, 6)  # [low, high) objects per scene
    palette_shift: int = 0   # class c prefers colour pool / texture c + shift
    saturation: tuple = (0.35, 0.95)  # HSV saturation and value ranges of the fills
    value: tuple = (0.35, 0.95)
    hue_jitter: float = 0.04          # std of a fill's hue around its pool's
    noise: tuple = (4.0, 14.0)        # range of the sensor noise's std (0-255 scale)
    illumination: float = 0.25        # largest gain change across the image
    blur: tuple = (0.3, 0.9)          # range of the Gaussian blur's sigma
    blur_kernel: int = 3
    # 0: one class per shape (the toy's 6 classes). More: each shape comes in (num_classes-1)/len(shapes)
    # variants that differ only in colour (adjacent hue pools out of `pools`), so that a teacher's doubt
    # spreads over several classes, as on a 21-class dataset (benchmarks/RESULTS.md, seventh session).
    num_classes: int = 0
    pools: int = 6

    @property
    def classes(self) -> int:
        """Classes in the label maps, background included."""
        return self.num_classes or len(self.shapes) + 1

    def __post_init__(self):
        objects, shapes = self.classes - 1, len(self.shapes)
        if objects < shapes or objects % shapes:
            raise ValueError(f"ToyStyle.num_classes={self.num_classes}: the {objects} object classes must be a "
                             f"multiple of the {shapes} shapes")


# The toy study's regime (docs/method.md, "The toy study"): the unlabeled and validation images are
# noisier, blurrier and less evenly lit than the labeled ones, which were "shot" under good
# conditions. The labeled split then covers only part of the variation the unlabeled pool covers,
# which is where self-training has something to teach (the issue 15 study measures it).
TARGET = ToyStyle(noise=(5.0, 20.0), illumination=0.4, blur=(0.4, 1.2), blur_kernel=5)
LABELED = ToyStyle(noise=(2.0, 6.0), illumination=0.1, blur=(0.3, 0.6), blur_kernel=3)
TOY_VERSION = 2  # bump when the generator's output for the default arguments changes
# The pretraining pool (the toy's ImageNet, see s4mc/toy_pretrain.py): other shapes, and colour
# and texture only half as telling and mapped to classes differently (shifted by 3), so the encoder
# learns generic colour, texture and edge features but not which of them means which target class.
PRETRAIN = ToyStyle(shapes=("star", "cross", "ellipse", "hexagon", "crescent"), class_pref=0.5, palette_shift=3,
                     scale=(0.10, 0.24), objects=(2, 7))


def _grid(size: int):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _texture(rng: np.random.Generator, kind: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A [0,1] field over the whole canvas (shapes are cut out of it)."""
    size = yy.shape[0]
    theta = rng.uniform(0, np.pi)
    f = rng.uniform(0.06, 0.22)  # cycles per pixel
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    if kind == 0:   # flat with faint low-frequency variation
        t = np.full_like(yy, 0.5)
    elif kind == 1:  # stripes
        t = 0.5 + 0.5 * np.sin(2 * np.pi * f * u + rng.uniform(0, 2 * np.pi))
    elif kind == 2:  # checker
        t = ((np.sin(2 * np.pi * f * u) > 0) ^ (np.sin(2 * np.pi * f * v) > 0)).astype(np.float32)
    elif kind == 3:  # smooth noise: random coarse grid, bilinearly upsampled
        g = rng.uniform(0, 1, (rng.integers(4, 12),) * 2).astype(np.float32)
        t = cv2.resize(g, (size, size), interpolation=cv2.INTER_LINEAR)
    else:            # dots
        t = ((np.sin(2 * np.pi * f * u) * np.sin(2 * np.pi * f * v)) > 0.4).astype(np.float32)
    return t.astype(np.float32)


def _colour(rng: np.random.Generator, pool: int, style: "ToyStyle") -> np.ndarray:
    """An RGB colour (0-255) from hue pool `pool`, with saturation/value jitter."""
    h = (pool / style.pools + rng.normal(0, style.hue_jitter)) % 1.0
    s = rng.uniform(*style.saturation)
    v = rng.uniform(*style.value)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255


def _paint(rng: np.random.Generator, cls: int, yy, xx, style: "ToyStyle") -> np.ndarray:
    """HxWx3 float image of a textured fill whose colour/texture prefer `cls` with probability `style.class_pref`."""
    pref, shift = style.class_pref, style.palette_shift
    pool = (cls + shift) % style.pools if rng.random() < pref else int(rng.integers(style.pools))
    tex = (_texture_of(cls, style) + shift) % _N_TEXTURES if rng.random() < pref else int(rng.integers(_N_TEXTURES))
    c1 = _colour(rng, pool, style)
    # second colour: same hue family, shifted brightness, so texture reads as texture
    c2 = np.clip(c1 * rng.uniform(0.4, 0.8) + rng.uniform(-30, 30, 3), 0, 255).astype(np.float32)
    t = _texture(rng, tex, yy, xx)[..., None]
    return c1 * (1 - t) + c2 * t


def _variants(style: "ToyStyle") -> int:
    return (style.classes - 1) // len(style.shapes)  # ToyStyle checks that it divides


def _texture_of(cls: int, style: "ToyStyle") -> int:
    """The texture class `cls` prefers: its shape's (all variants of a shape share it)."""
    return 0 if cls == 0 else (cls - 1) // _variants(style) + 1


def _polygon(dy, dx, r, sides, angle):
    """Regular polygon of circumradius r: inside every edge's half-plane."""
    inside = np.ones_like(dy, dtype=bool)
    apothem = r * np.cos(np.pi / sides)
    for k in range(sides):
        phi = angle + 2 * np.pi * k / sides
        inside &= dx * np.cos(phi) + dy * np.sin(phi) <= apothem
    return inside


def _shape_mask(rng: np.random.Generator, shape: str, yy, xx, size: int, scale=(0.10, 0.24)) -> np.ndarray:
    cy, cx = rng.uniform(0.1, 0.9, 2) * size
    r = rng.uniform(*scale) * size
    dy, dx = yy - cy, xx - cx
    a = rng.uniform(0, np.pi)
    u = dx * np.cos(a) + dy * np.sin(a)
    v = -dx * np.sin(a) + dy * np.cos(a)
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "rectangle":    # rotated, random aspect
        return (np.abs(u) <= r) & (np.abs(v) <= r * rng.uniform(0.45, 1.0))
    if shape == "triangle":     # three jittered vertices around the centre, half-plane tests
        ang = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.normal(0, 0.25, 3)
        rad = r * rng.uniform(1.0, 1.4, 3)
        py, px = cy + rad * np.sin(ang), cx + rad * np.cos(ang)
        gy, gx = py.mean(), px.mean()  # the centroid is always inside: it fixes each edge's sign
        inside = np.ones_like(yy, dtype=bool)
        for i in range(3):
            j = (i + 1) % 3
            cross = (px[j] - px[i]) * (yy - py[i]) - (py[j] - py[i]) * (xx - px[i])
            ref = (px[j] - px[i]) * (gy - py[i]) - (py[j] - py[i]) * (gx - px[i])
            inside &= cross * (1.0 if ref >= 0 else -1.0) >= 0
        return inside
    theta = np.arctan2(dy, dx)
    dist = np.sqrt(dy * dy + dx * dx)
    if shape == "blob":         # radius modulated by a few low harmonics
        rr = np.full_like(theta, r)
        for k in (2, 3, 4):
            rr += r * rng.uniform(0.08, 0.22) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        return dist <= rr
    if shape == "ring":         # annulus
        return (dist <= r) & (dist >= r * rng.uniform(0.45, 0.7))
    # The pretraining pool's shapes (see `PRETRAIN_SHAPES`): none of them is a target class.
    if shape == "star":
        return dist <= r * (0.62 + 0.38 * np.cos(5 * theta + rng.uniform(0, 2 * np.pi)))
    if shape == "cross":
        w = r * rng.uniform(0.25, 0.4)
        return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(u) <= w) & (np.abs(v) <= r))
    if shape == "ellipse":
        return (u / r) ** 2 + (v / (r * rng.uniform(0.3, 0.55))) ** 2 <= 1
    if shape == "hexagon":
        return _polygon(dy, dx, r, 6, a)
    if shape == "crescent":
        off = r * rng.uniform(0.35, 0.6)
        return (dist <= r) & ((u - off) ** 2 + v ** 2 > (0.85 * r) ** 2)
    raise ValueError(f"unknown toy shape {shape!r}")


def render_scene(rng: np.random.Generator, size: int = 128, style: ToyStyle = TARGET) -> tuple[np.ndarray, np.ndarray]:
    """One (RGB uint8 image, uint8 label) pair; label i > 0 is `style.shapes[i - 1]`."""
    yy, xx = _grid(size)
    img = _paint(rng, 0, yy, xx, style)
    # a second background texture in a random half-plane: backgrounds are not uniform
    if rng.random() < 0.5:
        a = rng.uniform(0, 2 * np.pi)
        side = (xx - size / 2) * np.cos(a) + (yy - size / 2) * np.sin(a) > rng.uniform(-0.3, 0.3) * size
        img = np.where(side[..., None], _paint(rng, 0, yy, xx, style), img)
    label = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(*style.objects))):
        cls = int(rng.integers(1, style.classes))
        m = _shape_mask(rng, style.shapes[(cls - 1) // _variants(style)], yy, xx, size, style.scale)
        img = np.where(m[..., None], _paint(rng, cls, yy, xx, style), img)
        label[m] = cls
    # illumination gradient, slight blur, sensor noise
    g = 1 + rng.uniform(-style.illumination, style.illumination) * ((xx * np.cos(rng.uniform(0, 6.3)) + yy * np.sin(rng.uniform(0, 6.3))) / size)
    img = img * g[..., None]
    img = cv2.GaussianBlur(img, (style.blur_kernel,) * 2, rng.uniform(*style.blur))
    img = img + rng.normal(0, rng.uniform(*style.noise), img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), label


def _write_mask(path: Path, label: np.ndarray) -> None:
    im = Image.fromarray(label, mode="P")
    flat = [c for rgb in TOY_PALETTE for c in rgb]
    im.putpalette(flat + [0] * (768 - len(flat)))
    im.save(path)


def generate_toy(root: str | os.PathLike, *, seed: int = 0, num_train: int = 400, num_labeled: int = 40,
                 num_val: int = 100, size: int = 128, overwrite: bool = False, style: ToyStyle = TARGET,
                 labeled_style: ToyStyle | None = LABELED) -> Path:
    """Write the toy dataset under `root` and return it.

    The labeled split's images are drawn with `labeled_style` (None: `style`), every other
    training and validation image with `style`; a scene's shapes and labels do not depend on
    either style's photometric settings, only on (seed, split, index).

    Written into a temporary sibling directory and renamed into place, so concurrent
    callers (several DDP ranks creating it at once) never see a half-written dataset.
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} exists and is not empty (pass overwrite=True / --overwrite)")
        shutil.rmtree(root)
    if not 0 < num_labeled <= num_train:
        raise ValueError(f"need 0 < num_labeled ({num_labeled}) <= num_train ({num_train})")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp", dir=root.parent))
    try:
        (tmp / "JPEGImages").mkdir()
        (tmp / "SegmentationClass").mkdir()
        (tmp / "splits").mkdir()
        ids = {"train": [f"train_{i:04d}" for i in range(num_train)],
               "val": [f"val_{i:04d}" for i in range(num_val)]}
        order = np.random.default_rng([seed, 99]).permutation(num_train)
        labeled_idx = set(order[:num_labeled].tolist())
        for split_no, (split, names) in enumerate(ids.items()):
            for i, name in enumerate(names):
                rng = np.random.default_rng([seed, split_no, i])
                labeled_image = split == "train" and i in labeled_idx and labeled_style is not None
                img, lab = render_scene(rng, size, labeled_style if labeled_image else style)
                cv2.imwrite(str(tmp / "JPEGImages" / f"{name}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
                _write_mask(tmp / "SegmentationClass" / f"{name}.png", lab)
        labeled = [ids["train"][i] for i in sorted(order[:num_labeled])]
        unlabeled = [ids["train"][i] for i in sorted(order[num_labeled:])]
        # train_all.txt: every training image with its label, for the all-labels reference row.
        for fname, names in (("labeled.txt", labeled), ("unlabeled.txt", unlabeled), ("val.txt", ids["val"]),
                             ("train_all.txt", ids["train"])):
            (tmp / "splits" / fname).write_text("".join(n + "\n" for n in names))
        info = {"toy_version": TOY_VERSION, "seed": seed, "num_train": num_train, "num_labeled": num_labeled,
                "num_val": num_val, "size": size, "style": asdict(style),
                "labeled_style": asdict(labeled_style) if labeled_style is not None else None}
        (tmp / "toy.json").write_text(json.dumps(info, indent=1) + "\n")
        try:
            os.rename(tmp, root)
        except OSError:
            # another process won the race (or root appeared as an empty dir)
            if root.exists() and not any(root.iterdir()):
                root.rmdir()
                os.rename(tmp, root)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def ensure_toy(root: str | os.PathLike, *, seed: int = 0) -> Path:
    """Create the toy dataset at `root` (default sizes, seed 0) when it is missing or empty."""
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        _check_version(root)
        return root
    t0 = time.perf_counter()
    generate_toy(root, seed=seed)
    log.warning("toy dataset was missing; generated it at %s (seed %d) in %.1f s",
                root, seed, time.perf_counter() - t0)
    return root


def _check_version(root: Path) -> None:
    """Refuse a toy folder written by an older generator: its numbers would not match the study's."""
    info_path = root / "toy.json"
    try:
        version = json.loads(info_path.read_text()).get("toy_version") if info_path.is_file() else None
    except (OSError, ValueError, AttributeError):
        version = None
    if version != TOY_VERSION:
        raise DataError(
            f"{root} holds a toy dataset from an older generator (toy.json: toy_version {version}, this code "
            f"writes {TOY_VERSION}); delete the folder, or regenerate it with "
            f"`python -m s4mc.data.toy --root {root} --overwrite`")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m s4mc.data.toy",
        description="Generate the procedural toy segmentation dataset (VOC-like layout; "
                    f"classes: {', '.join(TOY_CLASSES)}).")
    ap.add_argument("--root", default="data/toy", help="output directory (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="generation seed (default: %(default)s)")
    ap.add_argument("--num-train", type=int, default=400, help="training images (default: %(default)s)")
    ap.add_argument("--num-labeled", type=int, default=40,
                    help="of which listed in splits/labeled.txt (default: %(default)s)")
    ap.add_argument("--num-val", type=int, default=100, help="validation images (default: %(default)s)")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (default: %(default)s)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --root")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        root = generate_toy(a.root, seed=a.seed, num_train=a.num_train, num_labeled=a.num_labeled,
                            num_val=a.num_val, size=a.size, overwrite=a.overwrite)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.num_train} train ({a.num_labeled} labeled) + {a.num_val} val images to {root} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
