"""Predictions on a folder of images without labels (`eval.py --images DIR --save-dir OUT`).

Every image under DIR (nested folders too; png, jpg/jpeg, bmp, tif/tiff, webp, any case)
gets one palette PNG at its own size in OUT, under the same relative path with a .png
suffix, predicted with the config's inference protocol (`configured_inference`: whole
or sliding window, scales, flip, optional refinement). Two inputs that would share an
output name (a.jpg and a.png) keep their suffix in it instead (a.jpg.png, a.png.png).
Hidden files and folders (names starting with a dot, such as macOS's `._x.jpg`) and
anything already under OUT are not inputs.

An image that cannot be decoded is reported by name and skipped; the summary counts it.
Under torchrun each rank predicts every world_size-th file of the sorted list, so each
image is written exactly once, and rank 0 gathers the summary and draws the legend.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Dataset

from .data.datasets import IMAGE_EXTS, load_image
from .data.transforms import Normalize
from .distributed import all_gather_object
from .errors import DataError
from .palette import as_palette, save_prediction

log = logging.getLogger("s4mc")

LEGEND_NAME = "legend.png"


def list_images(root: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[Path]:
    """Image files under `root` (or `root` itself when it is a file), relative to it, sorted."""
    root = Path(root)
    if root.is_file():
        return [Path(root.name)]
    if not root.is_dir():
        raise DataError(f"--images {root}: no such folder or file")
    skip = Path(exclude).resolve() if exclude is not None else None
    found = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (skip is None or (here / d).resolve() != skip))
        found += [(here / f).relative_to(root) for f in files
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTS)]
    return sorted(found)


def output_names(files: Sequence[Path]) -> dict[Path, Path]:
    """Relative input path -> relative output PNG path; inputs sharing a stem keep their suffix."""
    stems: dict[Path, int] = {}
    for f in files:
        stems[f.with_suffix("")] = stems.get(f.with_suffix(""), 0) + 1
    return {f: f.with_suffix(".png") if stems[f.with_suffix("")] == 1 else f.with_name(f.name + ".png")
            for f in files}


class FolderImages(Dataset):
    """Normalised images of one rank's share; a file that does not decode yields its error instead."""

    def __init__(self, root: Path, files: Sequence[Path], mean, std, keep_rgb: bool):
        self.root, self.files = root, list(files)
        self.normalize = Normalize(mean, std)
        self.keep_rgb = keep_rgb

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        rel = self.files[index]
        path = self.root / rel if self.root.is_dir() else self.root
        try:
            rgb = load_image(str(path))
        except (DataError, cv2.error, OSError, ValueError) as exc:
            return {"file": rel, "error": str(exc)}
        return {"file": rel, "image": self.normalize(rgb), "rgb": rgb if self.keep_rgb else None}


def _unbatched(item):
    return item


@dataclass
class PredictSummary:
    """What a prediction run wrote (relative input paths) and what it skipped, over all ranks."""

    written: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"file": ..., "error": ...}
    seconds: float = 0.0
    legend: str | None = None

    def to_json(self) -> dict:
        return {"written": self.written, "skipped": self.skipped, "num_written": len(self.written),
                "num_skipped": len(self.skipped), "seconds": self.seconds, "legend": self.legend}

    def format(self, out_dir) -> str:
        # The skipped count is always printed, 0 included, so a script can rely on the line's shape.
        line = f"wrote {len(self.written)} predictions, skipped {len(self.skipped)} unreadable"
        if self.skipped:
            line += ": " + ", ".join(s["file"] for s in self.skipped)
        line += f" (into {out_dir} in {self.seconds:.1f}s"
        if self.legend:
            line += f"; class colours: {self.legend}"
        return line + ")"


def shard(files: Sequence, rank: int, world_size: int) -> list:
    """This rank's share of the sorted file list: every world_size-th file from `rank`.

    The shares are disjoint and together cover the list, so each image is written by exactly
    one process; interleaving (rather than contiguous blocks) keeps the shares within one file
    of each other in size and mixes the folders, so no rank gets all the large images of one.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of the {world_size} process(es)")
    return list(files[rank::world_size])


def draw_legend(path: str | os.PathLike, class_names: Sequence[str], palette) -> Path:
    """A small PNG with one colour swatch and name per class."""
    pal = as_palette(palette)
    font = ImageFont.load_default()
    row, swatch, pad = 18, 14, 4
    text_width = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(str(n), font=font)) for n in class_names)
    image = Image.new("RGB", (pad * 3 + swatch + text_width, pad * 2 + row * len(class_names)), "white")
    draw = ImageDraw.Draw(image)
    for i, name in enumerate(class_names):
        y = pad + i * row
        draw.rectangle([pad, y, pad + swatch - 1, y + swatch - 1], fill=tuple(int(c) for c in pal[i]), outline="gray")
        draw.text((pad * 2 + swatch, y + 1), str(name), fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def predict_folder(infer: Callable[[torch.Tensor], torch.Tensor], images: str | os.PathLike,
                   out_dir: str | os.PathLike, *, class_names: Sequence[str], palette, mean, std,
                   overlay: bool = False, rank: int = 0, world_size: int = 1, workers: int = 0) -> PredictSummary:
    """Predict every image under `images` into `out_dir`; see the module docstring.

    infer: normalised [1, 3, H, W] -> class scores [1, C, H, W] (see
    `s4mc.evaluation.configured_inference`). Returns the summary of all ranks (every rank
    must call this when world_size > 1: the summary is gathered).
    """
    images, out_dir = Path(images), Path(out_dir)
    files = list_images(images, exclude=out_dir)
    if not files:
        raise DataError(f"--images {images}: no image files ({', '.join(IMAGE_EXTS)}) found")
    names = output_names(files)
    legend_name = LEGEND_NAME if Path(LEGEND_NAME) not in names.values() else "_" + LEGEND_NAME
    mine = shard(files, rank, world_size)
    from s4mc.data.loaders import cap_workers

    loader = DataLoader(FolderImages(images, mine, mean, std, keep_rgb=overlay), batch_size=None,
                        num_workers=cap_workers(workers), collate_fn=_unbatched)
    written, skipped = [], []
    start = time.perf_counter()
    for item in loader:
        rel = item["file"]
        if "error" in item:
            log.warning("skipped %s: %s", rel, item["error"])
            skipped.append({"file": rel.as_posix(), "error": item["error"]})
            continue
        prob = infer(item["image"].unsqueeze(0))
        pred = prob.argmax(dim=1)[0].to(torch.uint8 if prob.shape[1] <= 256 else torch.int32).cpu().numpy()
        save_prediction(out_dir / names[rel], pred, palette, image=item["rgb"] if overlay else None)
        written.append(rel.as_posix())
        if rank == 0 and len(written) % 100 == 0:
            log.info("%d / about %d images predicted", len(written) * world_size, len(files))
    seconds = time.perf_counter() - start

    summary = PredictSummary()
    for part in all_gather_object({"written": written, "skipped": skipped, "seconds": seconds}):
        summary.written += part["written"]
        summary.skipped += part["skipped"]
        summary.seconds = max(summary.seconds, part["seconds"])
    summary.written.sort()
    summary.skipped.sort(key=lambda s: s["file"])
    if rank == 0:
        summary.legend = str(draw_legend(out_dir / legend_name, class_names, palette))
    return summary
