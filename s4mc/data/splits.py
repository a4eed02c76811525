"""Split lists: fetch the published ones, draw new ones, check them against a dataset.

    python -m s4mc.data.splits fetch [--out data/splits] [--only pascal/92 ...]
    python -m s4mc.data.splits make  --root DIR --image-dir images --mask-dir masks --num-labeled 50 --seed 0 --out DIR
    python -m s4mc.data.splits check --type pascal --root data/VOC2012 --list data/splits/pascal/92/labeled.txt

`fetch` verifies every download against the SHA-256 sums in split_sums.json (computed
from the lists the U2PL/S4MC papers used), because a split that silently changed
upstream would make results incomparable with the published tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import urllib.request
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from s4mc.errors import DataError

from .datasets import (DATASET_TYPES, IMAGE_EXTS, _check_root, _cityscapes_samples, _custom_samples, _paired_samples,
                       _voc_samples, read_split)

BASE_URL = "https://raw.githubusercontent.com/Haochen-Wang409/U2PL/main/data/splits/"
_SUMS_FILE = Path(__file__).with_name("split_sums.json")


# Published lists this project knows the source of but holds no verified checksums for (they could
# not be downloaded where the project was built): `fetch` refuses them and says how to place them by
# hand. Our folder name (the number of labeled images) <- the source's folder name.
MANUAL_SPLITS = {
    "coco": {
        "source": "https://github.com/LiheYoung/UniMatch/tree/main/splits/coco",
        "folders": {"232": "1_512", "463": "1_256", "925": "1_128", "1849": "1_64", "3697": "1_32"},
    },
    "ade20k": {
        "source": "https://github.com/LiheYoung/UniMatch-V2/tree/main/splits/ade20k",
        "folders": {"316": "1_64", "631": "1_32", "1263": "1_16", "2526": "1_8"},
    },
}


def manual_split_message(name: str, out_dir: str | os.PathLike = "data/splits") -> str:
    spec = MANUAL_SPLITS[name]
    pairs = ", ".join(f"{src}/ -> {name}/{ours}/" for ours, src in spec["folders"].items())
    return (f"the {name} split lists have no verified checksums in this project, so fetch does not download "
            f"them. Place them by hand: from {spec['source']} copy each folder's labeled.txt and unlabeled.txt "
            f"to {Path(out_dir) / name}/<labeled count>/ ({pairs}) and val.txt to {Path(out_dir) / name}/val.txt "
            f"(data/README.md, \"Split lists\")")


def split_sums() -> dict[str, dict]:
    """{relative path (e.g. "pascal/92/labeled.txt"): {"sha256", "lines", "bytes"}}."""
    return json.loads(_SUMS_FILE.read_text())["files"]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_split_bytes(rel: str, data: bytes, *, url: str = "", sums: dict | None = None) -> None:
    """Raise DataError naming the file (and URL) if `data` is not the known split."""
    sums = split_sums() if sums is None else sums
    if rel not in sums:
        raise DataError(f"no known checksum for split file {rel!r}")
    got, want = sha256_bytes(data), sums[rel]["sha256"]
    if got != want:
        src = f" downloaded from {url}" if url else ""
        raise DataError(
            f"checksum mismatch for split file {rel}{src}: sha256 {got}, expected {want} "
            "(the upstream list changed or the download is damaged)")


def _urlopen_fetch(url: str, timeout: float = 30.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (fixed https URL)
        return r.read()


def fetch_splits(out_dir: str | os.PathLike = "data/splits", *, only: Iterable[str] | None = None,
                 fetcher: Callable[[str], bytes] = _urlopen_fetch, base_url: str = BASE_URL,
                 sums: dict | None = None, force: bool = False) -> list[Path]:
    """Download the published split files into out_dir, verifying each.

    only: prefixes such as "pascal/92" or "cityscapes" (default: all). fetcher(url) ->
    bytes is injectable so verification can be tested offline. A file already present
    with the right checksum is kept; files are written only after verification (via a
    temporary name) so a failed fetch never leaves a bad list behind.
    """
    sums = split_sums() if sums is None else sums
    prefixes = [p.strip("/") for p in only] if only else None
    for p in prefixes or []:
        if p.split("/")[0] in MANUAL_SPLITS:
            raise DataError(manual_split_message(p.split("/")[0], out_dir))
    chosen = [rel for rel in sorted(sums)
              if prefixes is None or any(rel == p or rel.startswith(p + "/") for p in prefixes)]
    if not chosen:
        raise DataError(f"no known split file matches {list(only or [])}; known: {sorted(sums)}")
    out = Path(out_dir)
    written = []
    for rel in chosen:
        dest = out / rel
        if dest.is_file() and not force and sha256_bytes(dest.read_bytes()) == sums[rel]["sha256"]:
            written.append(dest)
            continue
        url = base_url + rel
        try:
            data = fetcher(url)
        except Exception as e:  # URLError, timeouts, HTTP errors, whatever a fetcher raises
            raise DataError(f"could not download split file {rel} from {url}: {e}") from e
        verify_split_bytes(rel, data, url=url, sums=sums)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
        written.append(dest)
    return written


def make_split(root: str | os.PathLike, *, num_labeled: int | None = None, labeled_fraction: float | None = None,
               num_val: int = 0, seed: int = 0, image_dir: str | None = None, mask_dir: str | None = None,
               image_suffix: str | None = None, mask_suffix: str = ".png",
               out_dir: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Draw labeled/unlabeled (and optionally val) id lists for a custom dataset.

    Only images with a mask can be labeled or val; images without one all go to the
    unlabeled list. Ids are image file stems (relative to image_dir). Deterministic
    given `seed`; written as labeled.txt / unlabeled.txt [/ val.txt] when out_dir is set.
    """
    root = Path(root)
    img_root = root / image_dir if image_dir else root
    if not img_root.is_dir():
        raise DataError(f"image directory not found: {img_root}")
    exts = (image_suffix,) if image_suffix else IMAGE_EXTS
    ids = sorted(str(p.relative_to(img_root).with_suffix("")) for p in img_root.rglob("*")
                 if p.is_file() and p.suffix.lower() in exts)
    if not ids:
        raise DataError(f"no images ({', '.join(exts)}) under {img_root}")
    mask_root = root / mask_dir if mask_dir else None
    with_mask = [i for i in ids if mask_root is not None and (mask_root / f"{i}{mask_suffix}").is_file()]
    masked = set(with_mask)
    without = [i for i in ids if i not in masked]
    if num_labeled is None:
        if labeled_fraction is None:
            raise DataError("give num_labeled or labeled_fraction")
        num_labeled = max(1, round(labeled_fraction * (len(with_mask) - num_val)))
    if num_labeled + num_val > len(with_mask):
        raise DataError(f"asked for {num_labeled} labeled + {num_val} val images, but only "
                        f"{len(with_mask)} images under {img_root} have a mask in {mask_root}")
    perm = np.random.default_rng(seed).permutation(len(with_mask))
    pick = [with_mask[i] for i in perm]
    val = sorted(pick[:num_val])
    labeled = sorted(pick[num_val:num_val + num_labeled])
    unlabeled = sorted(pick[num_val + num_labeled:] + without)
    result = {"labeled": labeled, "unlabeled": unlabeled}
    if num_val:
        result["val"] = val
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, lst in result.items():
            (out / f"{name}.txt").write_text("".join(x + "\n" for x in lst))
    return result


def check_split(dataset_type: str, root: str | os.PathLike, split: str | os.PathLike, *,
                masks: bool = True, **custom) -> dict[str, list[str]]:
    """{"missing_images": [...], "missing_masks": [...]} for every id of `split`."""
    # resolve without failing at the first missing file, so all of them are reported
    r = _check_root(root)
    lines = read_split(split)
    if dataset_type in ("pascal", "toy"):
        samples = _voc_samples(r, lines, ".jpg" if dataset_type == "pascal" else ".png", Path(split))
    elif dataset_type == "cityscapes":
        samples = _cityscapes_samples(r, lines, Path(split))
    elif dataset_type in ("coco", "ade20k"):
        samples = _paired_samples(r, lines, Path(split), dataset_type)
    elif dataset_type == "custom":
        samples = _custom_samples(r, lines, Path(split), custom.get("image_dir"), custom.get("mask_dir"),
                                  custom.get("image_suffix"), custom.get("mask_suffix", ".png"))
    else:
        raise DataError(f"unknown dataset type {dataset_type!r}; expected one of {DATASET_TYPES}")
    return {"missing_images": [s.image for s in samples if not os.path.isfile(s.image)],
            "missing_masks": [s.id for s in samples if s.mask is None] if masks else [],
            "total": [s.id for s in samples]}


def _cmd_fetch(a) -> int:
    files = fetch_splits(a.out, only=a.only, force=a.force)
    print(f"{len(files)} split files verified in {a.out}")
    return 0


def _cmd_make(a) -> int:
    res = make_split(a.root, num_labeled=a.num_labeled, labeled_fraction=a.labeled_fraction, num_val=a.num_val,
                     seed=a.seed, image_dir=a.image_dir, mask_dir=a.mask_dir, image_suffix=a.image_suffix,
                     mask_suffix=a.mask_suffix, out_dir=a.out)
    print(", ".join(f"{k}: {len(v)}" for k, v in res.items()) + f" -> {a.out}")
    return 0


def _cmd_check(a) -> int:
    res = check_split(a.type, a.root, a.list, masks=not a.no_masks, image_dir=a.image_dir, mask_dir=a.mask_dir,
                      image_suffix=a.image_suffix, mask_suffix=a.mask_suffix)
    n = len(res["total"])
    for p in res["missing_images"][: a.show]:
        print(f"missing image: {p}")
    for i in res["missing_masks"][: a.show]:
        print(f"missing mask: {i}")
    mi, mm = len(res["missing_images"]), len(res["missing_masks"])
    print(f"{a.list}: {n} ids, {mi} missing images, {mm} missing masks")
    return 1 if (mi or mm) else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m s4mc.data.splits",
                                 description="Fetch, draw and check labeled/unlabeled split lists.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    f = sub.add_parser("fetch", help="download the U2PL/S4MC split lists and verify their SHA-256",
                       description=f"Download the published split lists from {BASE_URL} and verify "
                                   "each against the checksums kept in s4mc/data/split_sums.json.")
    f.add_argument("--out", default="data/splits", help="destination folder (default: %(default)s)")
    f.add_argument("--only", nargs="*", metavar="PREFIX",
                   help="only these, e.g. pascal/92 cityscapes/186 pascal/val.txt (default: all)")
    f.add_argument("--force", action="store_true", help="re-download files that are already present and valid")
    f.set_defaults(func=_cmd_fetch)

    m = sub.add_parser("make", help="draw a new labeled/unlabeled split of a custom dataset",
                       description="Draw labeled/unlabeled (and val) lists of image ids from a seed. "
                                   "Only images with a mask can be labeled or val.")
    m.add_argument("--root", required=True, help="dataset root")
    m.add_argument("--image-dir", default=None, help="image folder, relative to --root (default: the root)")
    m.add_argument("--mask-dir", default=None, help="mask folder, relative to --root")
    m.add_argument("--image-suffix", default=None, help="image extension, e.g. .jpg (default: any common one)")
    m.add_argument("--mask-suffix", default=".png", help="mask extension (default: %(default)s)")
    g = m.add_mutually_exclusive_group(required=True)
    g.add_argument("--num-labeled", type=int, help="number of labeled images")
    g.add_argument("--labeled-fraction", type=float, help="fraction of the masked (non-val) images to label")
    m.add_argument("--num-val", type=int, default=0, help="also hold out this many masked images as val.txt")
    m.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    m.add_argument("--out", required=True, help="folder for labeled.txt / unlabeled.txt [/ val.txt]")
    m.set_defaults(func=_cmd_make)

    c = sub.add_parser("check", help="verify that every id of a split exists on disk",
                       description="Report ids whose image (or mask) is missing; exit status 1 if any.")
    c.add_argument("--type", required=True, choices=DATASET_TYPES, help="dataset layout")
    c.add_argument("--root", required=True, help="dataset root")
    c.add_argument("--list", required=True, help="split file")
    c.add_argument("--no-masks", action="store_true", help="do not require masks (unlabeled lists)")
    c.add_argument("--image-dir", default=None, help="custom: image folder relative to --root")
    c.add_argument("--mask-dir", default=None, help="custom: mask folder relative to --root")
    c.add_argument("--image-suffix", default=None, help="custom: image extension (default: any common one, as make detects)")
    c.add_argument("--mask-suffix", default=".png", help="custom: mask extension (default: %(default)s)")
    c.add_argument("--show", type=int, default=20, help="print at most this many missing entries per kind")
    c.set_defaults(func=_cmd_check)

    a = ap.parse_args(argv)
    try:
        return a.func(a)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
