"""Split lists: verify (or fetch) the published ones, draw new ones, check them against a dataset.

    python -m s4mc.data.splits fetch [--config C | --only pascal/92 ...] [--out data/splits] [--from DIR]
    python -m s4mc.data.splits fetch --source unimatch --unverified   # UniMatch's own lists, no checksums
    python -m s4mc.data.splits make  --root DIR --image-dir images --mask-dir masks --num-labeled 50 --seed 0 --out DIR
    python -m s4mc.data.splits check --type pascal --root data/VOC2012 --list data/splits/pascal/92/labeled.txt

The published lists ship in data/splits/ (data/splits/README.md). `fetch` checks files against
the SHA-256 sums in split_sums.json (computed from the lists the U2PL/S4MC papers used) and
downloads only what is missing or differs, because a split that silently changed would make
results incomparable with the published tables.
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

from s4mc import REPO_ROOT
from s4mc.config import load_config
from s4mc.errors import DataError, S4MCError

from .datasets import (DATASET_TYPES, IMAGE_EXTS, _check_root, _cityscapes_samples, _custom_samples, _paired_samples,
                       _voc_samples, read_split)

BASE_URL = "https://raw.githubusercontent.com/Haochen-Wang409/U2PL/main/data/splits/"
_SUMS_FILE = Path(__file__).with_name("split_sums.json")
# Where the lists ship, and where the configs in experiments/ read them.
SHIPPED_DIR = REPO_ROOT / "data" / "splits"

# UniMatch's own lists, at the commit its golden data was measured from (tests/data/unimatch_v1).
# Their checksums are not known here: the machine this was written on could not reach GitHub, so
# `fetch --source unimatch` writes them only when told they are unverified (data/README.md).
UNIMATCH_COMMIT = "0324f3dd4a22128105a5eb135d2586c0bb3cc647"
UNIMATCH_URL = f"https://raw.githubusercontent.com/LiheYoung/UniMatch/{UNIMATCH_COMMIT}/splits/"
# Our name -> UniMatch's path below splits/ (it names the blended and Cityscapes protocols by fraction).
_UNIMATCH_PROTOCOLS = {
    **{f"pascal/{n}": f"pascal/{n}" for n in (92, 183, 366, 732, 1464)},
    "pascal/662": "pascal/1_16", "pascal/1323": "pascal/1_8", "pascal/2646": "pascal/1_4", "pascal/5291": "pascal/1_2",
    "cityscapes/186": "cityscapes/1_16", "cityscapes/372": "cityscapes/1_8", "cityscapes/744": "cityscapes/1_4",
    "cityscapes/1488": "cityscapes/1_2",
}
UNIMATCH_SPLITS = {
    **{f"{ours}/{part}.txt": f"{theirs}/{part}.txt" for ours, theirs in _UNIMATCH_PROTOCOLS.items()
       for part in ("labeled", "unlabeled")},
    "pascal/val.txt": "pascal/val.txt", "cityscapes/val.txt": "cityscapes/val.txt",
}


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
            raise DataError(f"could not download split file {rel} from {url}: {e}\n{offline_routes(rel, url, dest)}") from e
        verify_split_bytes(rel, data, url=url, sums=sums)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
        written.append(dest)
    return written


def offline_routes(rel: str, url: str, dest: Path) -> str:
    """How to place a split file by hand when the network is not there."""
    shipped = SHIPPED_DIR / rel
    return (
        f"Without a network, put the file at {dest} by hand; fetch keeps any file whose SHA-256 matches "
        f"s4mc/data/split_sums.json, so run it again afterwards to verify:\n"
        f"  - from this repository, which ships every published list: {shipped} "
        f"(git checkout -- data/splits restores it), or: fetch --from {SHIPPED_DIR} --out {dest.parents[len(Path(rel).parts) - 1]}\n"
        f"  - from a clone of https://github.com/Haochen-Wang409/U2PL made elsewhere: fetch --from U2PL/data/splits\n"
        f"  - or download {url} on a machine with internet access and copy it to {dest}")


def local_fetcher(folder: str | os.PathLike, base_url: str = BASE_URL) -> Callable[[str], bytes]:
    """A fetcher that reads `base_url`-relative files from a local folder (fetch --from)."""
    folder = Path(folder)

    def read(url: str) -> bytes:
        path = folder / url[len(base_url):]
        if not path.is_file():
            raise DataError(f"{path} not found (fetch --from {folder})")
        return path.read_bytes()

    return read


def config_split_files(cfg: dict, sums: dict | None = None) -> dict[Path, list[str]]:
    """{folder: [relative names]} of the published lists a config reads (its labeled,
    unlabeled and val lists), each folder being where the config expects them."""
    sums = split_sums() if sums is None else sums
    ds = cfg["dataset"]
    paths = [ds["train"]["data_list"], ds["train"].get("unlabeled_list"), ds["val"]["data_list"]]
    found: dict[Path, list[str]] = {}
    unknown = []
    for text in filter(None, paths):
        path = Path(text)
        rel = next((r for r in sums if path.as_posix().endswith("/" + r)), None)
        if rel is None:
            unknown.append(str(path))
            continue
        found.setdefault(Path(path.as_posix()[:-len(rel) - 1]), []).append(rel)
    if not found:
        raise DataError(f"{cfg.get('config_file') or 'the config'} reads no published split list ({', '.join(unknown)}); "
                        f"draw your own with python -m s4mc.data.splits make")
    return found


def unimatch_line(rel: str, line: str) -> str:
    """One of UniMatch's lines ("<image path> <mask path>") in this package's form: the VOC id, or
    Cityscapes' leftImg8bit path."""
    image = line.split()[0]
    return Path(image).stem if rel.startswith("pascal/") else image


def fetch_unimatch_splits(out_dir: str | os.PathLike = "data/splits_unimatch", *, only: Iterable[str] | None = None,
                          unverified: bool = False, fetcher: Callable[[str], bytes] = _urlopen_fetch) -> list[Path]:
    """UniMatch's split lists at `UNIMATCH_COMMIT`, converted to this package's line form.

    No checksum of these lists is known, so nothing is written unless `unverified` is true; then
    each list is written with the sha256 of the downloaded file in `SHA256SUMS.unverified` beside
    the lists, to be checked against another copy before the sums join split_sums.json.
    """
    prefixes = [p.strip("/") for p in only] if only else None
    chosen = [rel for rel in sorted(UNIMATCH_SPLITS)
              if prefixes is None or any(rel == p or rel.startswith(p + "/") for p in prefixes)]
    if not chosen:
        raise DataError(f"no UniMatch split file matches {list(only or [])}; known: {sorted(UNIMATCH_SPLITS)}")
    if not unverified:
        raise DataError(
            f"UniMatch's split lists ({UNIMATCH_URL}) have no known checksums in this repository, so they cannot "
            "be verified; rerun with --unverified to fetch them anyway (their sha256 are written beside them)")
    out = Path(out_dir)
    written, sums = [], []
    for rel in chosen:
        url = UNIMATCH_URL + UNIMATCH_SPLITS[rel]
        try:
            data = fetcher(url)
        except Exception as e:  # URLError, timeouts, HTTP errors, whatever a fetcher raises
            raise DataError(f"could not download split file {rel} from {url}: {e}") from e
        lines = [unimatch_line(rel, ln) for ln in data.decode("utf-8").splitlines() if ln.strip()]
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text("\n".join(lines) + "\n")
        sums.append(f"{sha256_bytes(data)}  {UNIMATCH_SPLITS[rel]}  ({len(lines)} lines, from {url})")
        written.append(dest)
    (out / "SHA256SUMS.unverified").write_text("\n".join(sums) + "\n")
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
    if a.source == "unimatch":
        out = a.out or "data/splits_unimatch"
        files = fetch_unimatch_splits(out, only=a.only, unverified=a.unverified)
        print(f"{len(files)} UniMatch split files written to {out}, UNVERIFIED (sha256 in {out}/SHA256SUMS.unverified)")
        return 0
    fetcher = local_fetcher(a.from_dir) if a.from_dir else _urlopen_fetch
    if a.config:
        if a.only:
            raise DataError("give --config or --only, not both")
        targets = config_split_files(load_config(a.config))
        if a.out is not None:  # --out moves the config's lists elsewhere
            targets = {Path(a.out): sorted({rel for rels in targets.values() for rel in rels})}
    else:
        targets = {Path(a.out) if a.out is not None else SHIPPED_DIR: a.only}
    for out, only in targets.items():
        files = fetch_splits(out, only=only, force=a.force, fetcher=fetcher)
        print(f"{len(files)} split files verified in {out}")
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

    f = sub.add_parser("fetch", help="verify the shipped U2PL/S4MC split lists (download what is missing)",
                       description="Check the published split lists against the SHA-256 sums kept in "
                                   "s4mc/data/split_sums.json. They ship in data/splits/; a file that is missing "
                                   f"or differs is downloaded from {BASE_URL} (or read from --from DIR) and "
                                   "verified before it is written. Without --config or --only: every list.")
    f.add_argument("--config", default=None,
                   help="only the lists this config reads (its labeled, unlabeled and val lists), where it reads them")
    f.add_argument("--out", default=None, help=f"destination folder (default: {SHIPPED_DIR}, or the config's)")
    f.add_argument("--source", choices=("u2pl", "unimatch"), default="u2pl",
                   help="u2pl: U2PL/S4MC's lists, verified (default); unimatch: UniMatch's own, at commit "
                        f"{UNIMATCH_COMMIT[:7]}, with no known checksums (needs --unverified; written to "
                        "data/splits_unimatch unless --out)")
    f.add_argument("--unverified", action="store_true",
                   help="with --source unimatch: write the lists although no checksum can verify them")
    f.add_argument("--only", nargs="*", metavar="PREFIX",
                   help="only these, e.g. pascal/92 cityscapes/186 pascal/val.txt (default: all)")
    f.add_argument("--from", dest="from_dir", default=None, metavar="DIR",
                   help="take the files from a local folder instead of the network, e.g. a U2PL clone's data/splits")
    f.add_argument("--force", action="store_true", help="re-download files that are already present and valid")
    f.set_defaults(func=_cmd_fetch)

    m = sub.add_parser(
        "make", help="draw a new labeled/unlabeled split from any folder of images and masks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Draw labeled/unlabeled (and val) lists of image ids from a seed, for any layout in which\n"
                    "images and masks share their names, VOC's included: <root>/<image-dir>/<id>.<ext> and\n"
                    "<root>/<mask-dir>/<id><mask-suffix> (ids may include subfolders). Only images with a mask\n"
                    "can be labeled or val; the others all go to the unlabeled list. The lines are ids, which\n"
                    "dataset.type custom and pascal both read.",
        epilog="examples:\n"
               "  custom data:  python -m s4mc.data.splits make --root data/custom --image-dir images --mask-dir masks "
               "--num-labeled 50 --num-val 50 --out data/custom/splits\n"
               "  VOC:          python -m s4mc.data.splits make --root data/VOC2012 --image-dir JPEGImages "
               "--mask-dir SegmentationClassAug --image-suffix .jpg --num-labeled 200 --out data/splits/pascal_mine/200\n"
               "(Cityscapes masks are named differently from their images (*_gtFine_labelTrainIds.png), so its "
               "lists are not drawn by this command.)")
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
    except S4MCError as e:  # DataError, or a ConfigError from fetch --config
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
