"""COCO category ids <-> the 81 training classes, and a converter for masks that hold the ids.

`dataset.type: coco` reads masks as UniMatch prepares them: 0 background, 1..80 the annotated
thing categories in increasing category id (`classes.COCO_CATEGORY_IDS`), 255 ignore. Masks whose
pixels hold COCO's own category ids (1..90) instead are converted once with

    python -m s4mc.data.coco --src masks_by_category_id/ --dst data/coco/masks

Every id without annotations in COCO (`classes.COCO_UNANNOTATED_IDS`) and every other value except
the ignore value is an error naming the file: a silently dropped category would train a wrong model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from s4mc.errors import DataError

from .classes import COCO_CATEGORY_IDS, COCO_ID_TO_CLASS
from .datasets import load_mask

# Stands for "no class" in the lookup tables below; never a valid class or id (both stop below 91).
_NONE = 254


def _check_ignore(ignore_index: int) -> None:
    if not 92 <= ignore_index <= 255 or ignore_index == _NONE:
        raise DataError(f"ignore index {ignore_index} collides with a COCO category id or class; use 255")


def _id_lut(ignore_index: int) -> np.ndarray:
    _check_ignore(ignore_index)
    lut = np.full(256, _NONE, dtype=np.uint8)
    for cid, cls in COCO_ID_TO_CLASS.items():
        lut[cid] = cls
    lut[ignore_index] = ignore_index
    return lut


def _class_lut(ignore_index: int) -> np.ndarray:
    _check_ignore(ignore_index)
    lut = np.full(256, _NONE, dtype=np.uint8)
    lut[0] = 0
    for i, cid in enumerate(COCO_CATEGORY_IDS):
        lut[i + 1] = cid
    lut[ignore_index] = ignore_index
    return lut


def _apply(mask: np.ndarray, lut: np.ndarray, what: str, path: str) -> np.ndarray:
    if mask.dtype != np.uint8:
        if mask.size and (int(mask.min()) < 0 or int(mask.max()) > 255):
            raise DataError(f"{path or 'mask'}: values outside 0..255 cannot be {what}")
        mask = mask.astype(np.uint8)
    out = lut[mask]
    bad = out == _NONE
    if bad.any():
        vals = np.unique(mask[bad])[:10].tolist()
        raise DataError(f"{path or 'mask'}: values {vals} are not {what}")
    return out


def coco_ids_to_classes(mask: np.ndarray, ignore_index: int = 255, path: str = "") -> np.ndarray:
    """Category ids (0 background, the 80 annotated ids) -> class indices 0..80; ignore kept."""
    return _apply(mask, _id_lut(ignore_index), "background (0), an annotated COCO category id or the ignore value",
                  path)


def classes_to_coco_ids(mask: np.ndarray, ignore_index: int = 255, path: str = "") -> np.ndarray:
    """Class indices 0..80 -> category ids (0 stays background); ignore kept."""
    return _apply(mask, _class_lut(ignore_index), "COCO class indices 0..80 or the ignore value", path)


def convert_folder(src: str | Path, dst: str | Path, ignore_index: int = 255) -> int:
    """Convert every PNG under `src` (category ids) to `dst` (class indices), same relative paths."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DataError(f"--src {src} is not a folder")
    files = sorted(p for p in src.rglob("*.png") if p.is_file())
    if not files:
        raise DataError(f"no .png masks under {src}")
    for p in files:
        out = dst / p.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(coco_ids_to_classes(load_mask(str(p)), ignore_index, str(p)), mode="L").save(out)
    return len(files)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m s4mc.data.coco",
                                 description="Convert COCO masks holding category ids (0 background, 1..90) into "
                                             "the 81-class masks dataset.type coco reads (data/README.md).")
    ap.add_argument("--src", required=True, help="folder of PNG masks whose pixels are COCO category ids")
    ap.add_argument("--dst", required=True, help="output folder (e.g. data/coco/masks)")
    ap.add_argument("--ignore-index", type=int, default=255, help="value kept as ignore (default: %(default)s)")
    a = ap.parse_args(argv)
    try:
        n = convert_folder(a.src, a.dst, a.ignore_index)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{n} masks converted into {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
