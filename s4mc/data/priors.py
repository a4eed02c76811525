"""Per-class neighbour priors E_c for the refinement's joint term (docs/method.md step 6): the
published tables, how a config names one (`resolve_prior`), and measuring one on labeled masks.

The tables are the numbers published with the original S4MC release (index = class id;
Cityscapes uses trainIds); none is published for COCO or ADE20K. Measure one for other data with:

    python -m s4mc.data.priors --type pascal --root data/VOC2012 \
        --list data/splits/pascal/92/labeled.txt --num-classes 21 --out priors_voc92.json
    python -m s4mc.data.priors --config experiments/toy/config.yaml --out toy_prior.json

E_c = (# ordered pairs (p, q), q a 4-neighbour of p inside the image, label(p) = c,
       label(q) = c) / (# ordered pairs with label(p) = c and label(q) not ignored).
That is the fraction of a class-c pixel's neighbours that are also class c, pooled
over all pixels of the split. Pairs touching an ignore pixel are left out (VOC's
255 object boundaries would otherwise pull every E_c down), as are neighbours beyond
the image border. Only the labeled split is read: using the unlabeled ground truth
would leak labels into a semi-supervised run.

Output JSON: {"prior": [E_0, ...], "dataset": ..., "split": ..., "neighbors": 4,
"pixels": [...]} -- point trainer.unsupervised.neighbor_prior at it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from s4mc.config import load_config
from s4mc.errors import ConfigError, DataError

from .datasets import DATASET_TYPES, SegmentationDataset, build_samples
from .loaders import _dataset_type, _maybe_make_toy

PRIORS = {
    "pascal": [
        0.9980886695132567,
        0.9860495622941258,
        0.9555923573386919,
        0.9888166500147213,
        0.9861891841249937,
        0.9894536447668415,
        0.9928481727772317,
        0.9899944432748093,
        0.9939554498312092,
        0.9723734804881907,
        0.9814734877790432,
        0.992167780556063,
        0.9921082109870506,
        0.9904260573555301,
        0.9877020724598903,
        0.9890704556150036,
        0.9771896568239452,
        0.9865771364049042,
        0.9878175644560833,
        0.9948415228771397,
        0.993315147276186,
    ],
    "cityscapes": [
        0.9964431323326034,
        0.9861639854327645,
        0.961200350864672,
        0.831981383888851,
        0.9733805255682632,
        0.9763628214927057,
        0.9914859783638212,
        0.9967060462154962,
        0.9877697391019615,
        0.98401636296503,
        0.9905921230630785,
        0.990570758079667,
        0.9847896602829518,
        0.9842767938040367,
        0.9516618302498175,
        0.9894203625002091,
        0.9713330344039811,
        0.9448128823732177,
        0.9544919165416704,
    ],
}

_NO_PRIOR = ("none", "null", "")


def _dataset_key(dataset_type):
    # Tolerate the release's dataset names ("pascal_semi") as well as the new ones.
    return str(dataset_type).removesuffix("_semi") if dataset_type is not None else None


def _from_file(path, dataset_type):
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read neighbour prior file {str(path)!r}: {exc}") from exc
    if isinstance(data, dict):
        key = _dataset_key(dataset_type)
        if key in data:
            return data[key]
        if "prior" in data:
            return data["prior"]
        raise ConfigError(f"neighbour prior file {str(path)!r} has neither a {key!r} nor a 'prior' key "
                          f"(keys: {sorted(data)})")
    return data


def resolve_prior(spec, num_classes, dataset_type):
    """Turn `trainer.unsupervised.neighbor_prior` into a float32 tensor [num_classes] or None.

    spec: "auto" (the table of `dataset_type`, None when there is none), a table name
    ("pascal", "cityscapes"), "none"/None, a sequence of floats, or a path to a JSON file
    holding a list or a dict keyed by the dataset type or "prior".
    """
    source = repr(spec)
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in _NO_PRIOR):
        return None
    if isinstance(spec, str) and spec == "auto":
        key = _dataset_key(dataset_type)
        if key not in PRIORS:
            return None
        values, source = PRIORS[key], f"table {key!r}"
    elif isinstance(spec, str) and spec in PRIORS:
        values, source = PRIORS[spec], f"table {spec!r}"
    elif isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"neighbour_prior {str(spec)!r} is neither 'auto', 'none', a table name "
                              f"({', '.join(PRIORS)}) nor an existing JSON file; measure one from the labeled "
                              f"split with python -m s4mc.data.priors --config CONFIG --out {spec}")
        values, source = _from_file(path, dataset_type), f"file {str(path)!r}"
    else:
        values = spec
    try:
        prior = torch.as_tensor(values, dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"neighbour prior from {source} is not a list of numbers: {exc}") from exc
    if prior.dim() != 1 or prior.numel() != num_classes:
        raise ConfigError(f"neighbour prior from {source} has {prior.numel()} values, "
                          f"expected one per class ({num_classes})")
    if not bool(((prior >= 0) & (prior <= 1)).all()):
        raise ConfigError(f"neighbour prior from {source} has values outside [0, 1]")
    return prior


def _pair_counts(a: np.ndarray, b: np.ndarray, ignore_index: int, C: int, same: np.ndarray, total: np.ndarray):
    valid = (a != ignore_index) & (b != ignore_index)
    a, b = a[valid].astype(np.int64), b[valid].astype(np.int64)
    eq = a == b
    # each unordered pair contributes once from each endpoint's side
    same += 2 * np.bincount(a[eq], minlength=C)[:C]
    total += np.bincount(a, minlength=C)[:C] + np.bincount(b, minlength=C)[:C]


def neighbor_counts(label: np.ndarray, num_classes: int, ignore_index: int = 255, neighbors: int = 4):
    """(same, total) int64 arrays of length C for one mask (see module doc)."""
    if neighbors not in (4, 8):
        raise ValueError(f"neighbors must be 4 or 8, got {neighbors}")
    C = num_classes
    same = np.zeros(C, np.int64)
    total = np.zeros(C, np.int64)
    _pair_counts(label[:, :-1], label[:, 1:], ignore_index, C, same, total)   # horizontal
    _pair_counts(label[:-1, :], label[1:, :], ignore_index, C, same, total)   # vertical
    if neighbors == 8:
        _pair_counts(label[:-1, :-1], label[1:, 1:], ignore_index, C, same, total)
        _pair_counts(label[:-1, 1:], label[1:, :-1], ignore_index, C, same, total)
    return same, total


def neighbor_prior(labels: Iterable[np.ndarray], num_classes: int, ignore_index: int = 255,
                   neighbors: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(E float64[C], pixels int64[C]); a class never seen gets E_c = 0."""
    same = np.zeros(num_classes, np.int64)
    total = np.zeros(num_classes, np.int64)
    pixels = np.zeros(num_classes, np.int64)
    for lab in labels:
        s, t = neighbor_counts(lab, num_classes, ignore_index, neighbors)
        same += s
        total += t
        v = lab[lab != ignore_index].astype(np.int64)
        pixels += np.bincount(v, minlength=num_classes)[:num_classes]
    prior = np.divide(same, total, out=np.zeros(num_classes, np.float64), where=total > 0)
    return prior, pixels


def prior_for_split(dataset_type: str, root: str, split: str, num_classes: int, *, ignore_index: int = 255,
                    neighbors: int = 4, **custom) -> dict:
    samples = build_samples(dataset_type, root, split, require_masks=True, **custom)
    ds = SegmentationDataset(samples, num_classes=num_classes, ignore_index=ignore_index)
    # ds.load checks each mask (size, value range) and maps Cityscapes labelIds
    prior, pixels = neighbor_prior((ds.load(i)[1] for i in range(len(ds))), num_classes, ignore_index, neighbors)
    return {"prior": prior.tolist(), "dataset": dataset_type, "split": str(split), "neighbors": neighbors,
            "num_images": len(ds), "pixels": pixels.tolist()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m s4mc.data.priors",
        description="Compute the per-class neighbour prior E_c from the labeled split and write it as JSON "
                    "(usable as trainer.unsupervised.neighbor_prior).")
    ap.add_argument("--config", help="experiment config; takes type/root/list/classes/ignore from it")
    ap.add_argument("--type", choices=DATASET_TYPES, help="dataset layout (without --config)")
    ap.add_argument("--root", help="dataset root (without --config)")
    ap.add_argument("--list", help="labeled split file (without --config)")
    ap.add_argument("--num-classes", type=int, help="number of classes (without --config)")
    ap.add_argument("--ignore-index", type=int, default=255, help="ignored label value (default: %(default)s)")
    ap.add_argument("--image-dir", help="custom: image folder relative to --root")
    ap.add_argument("--mask-dir", help="custom: mask folder relative to --root")
    ap.add_argument("--image-suffix", default=None, help="custom: image extension (default: any common one)")
    ap.add_argument("--mask-suffix", default=".png", help="custom: mask extension (default: %(default)s)")
    ap.add_argument("--neighbors", type=int, choices=(4, 8), default=None,
                    help="neighbourhood (default: the config's trainer.unsupervised.neighborhood_size, else 4)")
    ap.add_argument("--out", required=True, help="output JSON path")
    a = ap.parse_args(argv)
    custom = {"image_dir": a.image_dir, "mask_dir": a.mask_dir, "image_suffix": a.image_suffix,
              "mask_suffix": a.mask_suffix}
    try:
        if a.config:
            cfg = load_config(a.config, [])
            dtype = _dataset_type(cfg)
            root, split = cfg["dataset"]["train"]["data_root"], cfg["dataset"]["train"]["data_list"]
            n, ignore = int(cfg["net"]["num_classes"]), int(cfg["dataset"]["ignore_index"])
            custom = {k: cfg["dataset"][k] for k in custom}
            if a.neighbors is None:  # the prior must match the neighbourhood the run refines with
                a.neighbors = int(cfg["trainer"]["unsupervised"]["neighborhood_size"])
            _maybe_make_toy(cfg, root, "dataset.train.data_root")
            if not Path(root).is_dir():
                raise DataError(f"dataset.train.data_root: the dataset root {root} does not exist or is not a directory")
        else:
            missing = [f"--{k}" for k in ("type", "root", "list", "num_classes") if getattr(a, k) is None]
            if missing:
                ap.error(f"without --config, give {', '.join(m.replace('_', '-') for m in missing)}")
            dtype, root, split, n, ignore = a.type, a.root, a.list, a.num_classes, a.ignore_index
        result = prior_for_split(dtype, root, split, n, ignore_index=ignore, neighbors=a.neighbors or 4, **custom)
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"E_c over {result['num_images']} labeled images -> {out}: "
          + " ".join(f"{x:.4f}" for x in result["prior"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
