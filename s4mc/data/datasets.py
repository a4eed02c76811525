"""Dataset layouts (PASCAL VOC, Cityscapes, COCO, ADE20K, custom folders, toy) and file loading.

A split file is turned into a list of `Sample`s (id, image path, mask path or None)
up front, so a missing image is reported when the run starts, naming the file, and
not hours later inside a worker process. Decoding happens lazily in
`SegmentationDataset.__getitem__`, which also checks each mask cheaply (size and
value range) because a silently wrong label (an RGB mask, Cityscapes labelIds fed as
trainIds) trains a model that looks fine but is wrong.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from s4mc.errors import DataError

from .classes import ADE20K_CLASSES, CITYSCAPES_ID_TO_TRAINID

# cv2 spawns its own thread pool per process; inside DataLoader workers that
# oversubscribes the CPU (workers x cores threads), so keep it single-threaded.
cv2.setNumThreads(0)

DATASET_TYPES = ("pascal", "cityscapes", "custom", "toy", "coco", "ade20k")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Sample:
    id: str
    image: str
    mask: str | None  # None: no ground truth (label becomes all-ignore)
    cityscapes_label_ids: bool = False  # mask holds the 34 official ids, not trainIds
    # How the stored values become class indices beyond that: None (as stored), "coco" (as stored,
    # UniMatch's 0..80; range errors then name COCO's ids), "ade20k" (0 -> ignore, v -> v - 1).
    label_map: str | None = None


def read_split(path: str | os.PathLike) -> list[str]:
    """Non-empty, stripped lines of a split file (works without a final newline, CRLF too)."""
    p = Path(path)
    if not p.is_file():
        hint = ""
        if "splits" in p.parts and ("pascal" in p.parts or "cityscapes" in p.parts):
            hint = "; fetch the U2PL/S4MC lists with `python -m s4mc.data.splits fetch`"
        elif "splits" in p.parts and ("coco" in p.parts or "ade20k" in p.parts):
            hint = ("; UniMatch's COCO / UniMatch V2's ADE20K lists are placed by hand "
                    "(data/README.md, \"Split lists\")")
        raise DataError(f"split file not found: {p}{hint}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read split file {p}: {e}") from e
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise DataError(f"split file is empty: {p}")
    return lines


def default_unlabeled_list(labeled_list: str | os.PathLike) -> Path:
    """The release's convention: .../labeled.txt sits beside .../unlabeled.txt."""
    p = Path(labeled_list)
    if p.name == "labeled.txt":
        return p.with_name("unlabeled.txt")
    raise DataError(
        f"dataset.train.unlabeled_list is not set and cannot be derived from {p} "
        "(only a file named labeled.txt has an implied unlabeled.txt beside it)"
    )


def cityscapes_lut(ignore_index: int = 255) -> np.ndarray:
    """256-entry lookup table: official labelId -> trainId, everything else -> ignore."""
    lut = np.full(256, ignore_index, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_ID_TO_TRAINID.items():
        lut[label_id] = train_id
    return lut


def ade20k_lut(ignore_index: int = 255) -> np.ndarray:
    """256-entry lookup table for ADE20K's official annotations: 0 ("other") -> ignore, v -> v - 1.

    Entries above 150 are never used: `map_ade20k` refuses such masks before looking them up.
    """
    lut = (np.arange(256, dtype=np.int64) - 1).clip(0, 255).astype(np.uint8)
    lut[0] = ignore_index
    return lut


def map_ade20k(raw: np.ndarray, ignore_index: int, path: str) -> np.ndarray:
    """An official ADE20K annotation (0..150) as class indices (0..149, `ignore_index`)."""
    n = len(ADE20K_CLASSES)
    if raw.size and int(raw.max()) > n:
        vals = np.unique(raw[raw > n])[:10].tolist()
        raise DataError(
            f"ADE20K annotation has values {vals} above {n}: {path}. dataset.type ade20k reads the "
            f"official annotations (0 = other, 1..{n} = the classes) and shifts them itself; a mask that "
            f"is already shifted (0..{n - 1}, 255 = ignore) would be shifted twice. Use the annotations of "
            f"ADEChallengeData2016.zip (data/README.md)")
    return ade20k_lut(ignore_index)[raw]


# ---------------------------------------------------------------------------
# split lines -> samples
# ---------------------------------------------------------------------------

def _check_root(root: str | os.PathLike) -> Path:
    r = Path(root)
    if not r.is_dir():
        raise DataError(f"dataset root does not exist or is not a directory: {r}")
    return r


def _voc_samples(root: Path, ids: Sequence[str], image_suffix: str, split: Path) -> list[Sample]:
    aug = root / "SegmentationClassAug"
    fine = root / "SegmentationClass"
    has_aug, has_fine = aug.is_dir(), fine.is_dir()
    out = []
    for line in ids:
        sid = line.split()[0]
        img = root / "JPEGImages" / f"{sid}{image_suffix}"
        mask = None
        # SBD-augmented masks first (they cover all 10,582 train ids); the 1,464/1,449
        # fine masks of plain VOC2012 are the fallback, file by file.
        if has_aug and (aug / f"{sid}.png").is_file():
            mask = aug / f"{sid}.png"
        elif has_fine and (fine / f"{sid}.png").is_file():
            mask = fine / f"{sid}.png"
        out.append(Sample(sid, str(img), str(mask) if mask else None))
    return out


def _cityscapes_samples(root: Path, lines: Sequence[str], split: Path) -> list[Sample]:
    out = []
    for line in lines:
        rel = line.split()[0]
        img = root / rel
        parts = Path(rel).parts
        if len(parts) < 3 or parts[0] != "leftImg8bit" or not rel.endswith("_leftImg8bit.png"):
            raise DataError(
                f"{split}: Cityscapes split lines must look like "
                f"'leftImg8bit/<split>/<city>/<name>_leftImg8bit.png', got {rel!r}"
            )
        stem = Path(rel).name[: -len("_leftImg8bit.png")]
        gt_dir = root.joinpath("gtFine", *parts[1:-1])
        train_ids = gt_dir / f"{stem}_gtFine_labelTrainIds.png"
        label_ids = gt_dir / f"{stem}_gtFine_labelIds.png"
        if train_ids.is_file():
            out.append(Sample(stem, str(img), str(train_ids)))
        elif label_ids.is_file():
            # Raw downloads only carry labelIds; mapping them here (instead of training
            # on them directly, as the original release did by mistake) gives 19 classes.
            out.append(Sample(stem, str(img), str(label_ids), cityscapes_label_ids=True))
        else:
            out.append(Sample(stem, str(img), None))
    return out


# One-path lines of the two-path layouts: the image's folder and where its mask is.
_PAIRED_MASKS = {
    # UniMatch: train2017/<id>.jpg and val2017/<id>.jpg, every mask in masks/<id>.png
    "coco": lambda rel: Path("masks") / (Path(rel).stem + ".png"),
    # ADEChallengeData2016: images/<split>/<name>.jpg, annotations/<split>/<name>.png
    "ade20k": lambda rel: Path("annotations", *Path(rel).parts[1:-1]) / (Path(rel).stem + ".png"),
}
_PAIRED_IMAGE_DIRS = {"coco": ("train2017", "val2017"), "ade20k": ("images",)}


def _paired_samples(root: Path, lines: Sequence[str], split: Path, kind: str) -> list[Sample]:
    """COCO / ADE20K lines as UniMatch writes them, `image mask` relative to the root; a line with
    the image alone takes its mask from the layout (`_PAIRED_MASKS`)."""
    out = []
    for line in lines:
        tokens = line.split()
        rel = tokens[0]
        if Path(rel).parts[0] not in _PAIRED_IMAGE_DIRS[kind]:
            raise DataError(
                f"{split}: {kind} split lines start with an image path under "
                f"{' or '.join(d + '/' for d in _PAIRED_IMAGE_DIRS[kind])} (data/README.md), got {line!r}")
        mask = root / (tokens[1] if len(tokens) >= 2 else _PAIRED_MASKS[kind](rel))
        out.append(Sample(Path(rel).stem, str(root / rel), str(mask) if mask.is_file() else None,
                          label_map=kind))
    return out


def _find_image(folder: Path, sid: str, image_suffix: str | None) -> Path:
    """`<sid><image_suffix>`; with no suffix, the first of IMAGE_EXTS that exists (as `splits make`
    detects images), else the .jpg path for the not-found error."""
    if image_suffix:
        return folder / f"{sid}{image_suffix}"
    for ext in IMAGE_EXTS + tuple(e.upper() for e in IMAGE_EXTS):
        if (folder / f"{sid}{ext}").is_file():
            return folder / f"{sid}{ext}"
    return folder / f"{sid}.jpg"


def _custom_samples(root: Path, lines: Sequence[str], split: Path, image_dir: str | None,
                    mask_dir: str | None, image_suffix: str | None, mask_suffix: str) -> list[Sample]:
    img_root = root / image_dir if image_dir else root
    mask_root = root / mask_dir if mask_dir else None
    out = []
    for line in lines:
        tokens = line.split()
        first = tokens[0]
        if len(tokens) >= 2:
            # "image_path mask_path" lines (relative to data_root): a list file that
            # names both files explicitly.
            img, mask = root / first, root / tokens[1]
            sid = Path(first).stem
            out.append(Sample(sid, str(img), str(mask) if mask.is_file() else None))
            continue
        if first.lower().endswith(IMAGE_EXTS):
            img = img_root / first
            sid = str(Path(first).with_suffix(""))
        else:
            sid = first
            img = _find_image(img_root, first, image_suffix)
        mask = None
        if mask_root is not None:
            cand = mask_root / f"{sid}{mask_suffix}"
            mask = cand if cand.is_file() else None
        out.append(Sample(sid, str(img), str(mask) if mask else None))
    return out


def build_samples(dataset_type: str, root: str | os.PathLike, split: str | os.PathLike, *,
                  require_masks: bool, image_dir: str | None = None, mask_dir: str | None = None,
                  image_suffix: str | None = None, mask_suffix: str = ".png") -> list[Sample]:
    """Resolve every line of `split` under `root`; check that each image exists.

    require_masks: labeled and validation sets need ground truth for every id; an
    unlabeled set may lack it (its "label" is then all-ignore).
    """
    if dataset_type not in DATASET_TYPES:
        raise DataError(f"unknown dataset.type {dataset_type!r}; expected one of {DATASET_TYPES}")
    r = _check_root(root)
    split = Path(split)
    lines = read_split(split)
    if dataset_type == "pascal":
        samples = _voc_samples(r, lines, ".jpg", split)
    elif dataset_type == "toy":
        samples = _voc_samples(r, lines, ".png", split)
    elif dataset_type == "cityscapes":
        samples = _cityscapes_samples(r, lines, split)
    elif dataset_type in _PAIRED_MASKS:
        samples = _paired_samples(r, lines, split, dataset_type)
    else:
        samples = _custom_samples(r, lines, split, image_dir, mask_dir, image_suffix, mask_suffix)
    for s in samples:
        if not os.path.isfile(s.image):
            raise DataError(f"image for id {s.id!r} (listed in {split}) not found: {s.image}")
        if require_masks and s.mask is None:
            raise DataError(f"no mask for id {s.id!r} (listed in {split}) under {r}")
    return samples


# ---------------------------------------------------------------------------
# decoding and checks
# ---------------------------------------------------------------------------

def load_image(path: str) -> np.ndarray:
    """RGB uint8 HxWx3. cv2 decodes JPEG faster than PIL; it returns None on failure."""
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        if not os.path.isfile(path):
            raise DataError(f"image not found: {path}")
        raise DataError(f"cannot decode image (corrupt or unsupported format): {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def load_mask(path: str, *, lut: np.ndarray | None = None) -> np.ndarray:
    """Class-index mask HxW. PIL, not cv2: palette PNGs (VOC SegmentationClass) must
    decode to their indices, which cv2 would expand to colours."""
    try:
        with Image.open(path) as im:
            if im.mode in ("RGB", "RGBA"):
                raise DataError(
                    f"mask is a colour image ({im.mode}); expected a single-channel index or "
                    f"palette PNG: {path}"
                )
            arr = np.array(im)
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"mask not found: {path}") from e
    except Exception as e:  # PIL raises a zoo of types for truncated/corrupt files
        raise DataError(f"cannot decode mask (corrupt or unsupported format): {path}: {e}") from e
    if arr.ndim != 2:
        raise DataError(f"mask must be 2-D (one class index per pixel), got shape {arr.shape}: {path}")
    if lut is not None:
        arr = lut[arr]
    return arr


_RANGE_HINTS = {
    None: "wrong num_classes, an RGB/colour mask, or Cityscapes labelIds?",
    "coco": "COCO category ids (1..90) instead of UniMatch's class indices 0..80? "
            "convert them with python -m s4mc.data.coco",
}


def check_label_range(label: np.ndarray, num_classes: int, ignore_index: int, path: str,
                      label_map: str | None = None) -> None:
    """Cheap: one max (and, only when it exceeds C, a unique over the offending pixels)."""
    if label.size == 0:
        return
    if int(label.max()) < num_classes and int(label.min()) >= 0:
        return
    bad = (label >= num_classes) | (label < 0)
    bad &= label != ignore_index
    if bad.any():
        vals = np.unique(label[bad])[:10].tolist()
        raise DataError(
            f"mask has values {vals} outside [0, {num_classes}) and not the ignore index "
            f"{ignore_index}: {path} ({_RANGE_HINTS.get(label_map, _RANGE_HINTS[None])})"
        )


class SegmentationDataset(torch.utils.data.Dataset):
    """Loads (image, mask) pairs from `samples` and applies a joint transform.

    transform(image_uint8_hwc, label_hw) -> dict with at least "image" and "label".
    """

    def __init__(self, samples: Sequence[Sample], *, num_classes: int, ignore_index: int = 255,
                 transform: Callable[[np.ndarray, np.ndarray], dict] | None = None):
        if not samples:
            raise DataError("dataset has no samples")
        self.samples = list(samples)
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.transform = transform
        self._cs_lut = cityscapes_lut(self.ignore_index)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.samples[index]
        image = load_image(s.image)
        if s.mask is None:
            label = np.full(image.shape[:2], self.ignore_index, dtype=np.uint8)
            return image, label
        label = load_mask(s.mask, lut=self._cs_lut if s.cityscapes_label_ids else None)
        if s.label_map == "ade20k":
            label = map_ade20k(label, self.ignore_index, s.mask)
        if label.shape != image.shape[:2]:
            raise DataError(
                f"mask size {label.shape[1]}x{label.shape[0]} differs from image size "
                f"{image.shape[1]}x{image.shape[0]}: mask {s.mask}, image {s.image}"
            )
        check_label_range(label, self.num_classes, self.ignore_index, s.mask, s.label_map)
        return image, label

    def __getitem__(self, index: int) -> dict:
        image, label = self.load(index)
        if self.transform is None:
            out = {"image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
                   "label": torch.from_numpy(label.astype(np.int64))}
        else:
            out = self.transform(image, label)
        out["id"] = self.samples[index].id
        return out


class RepeatDataset(torch.utils.data.Dataset):
    """`dataset` viewed as `length` items (index modulo its size), so the small labeled
    set spans a whole unlabeled epoch; with a shuffling sampler each labeled image then
    appears floor or ceil(length / len) times per epoch."""

    def __init__(self, dataset, length: int):
        self.dataset = dataset
        self.length = int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.dataset[index % len(self.dataset)]
