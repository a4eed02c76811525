"""Per-class neighbour priors E_c for the refinement's joint term (docs/method.md step 6).

E_c is the fraction of a pixel's 4-connected neighbours that carry the same ground-truth
class c, measured on each dataset's training labels; the numbers are the ones published
with the original S4MC release (index = class id; Cityscapes uses trainIds).
"""
import json
from pathlib import Path

import torch

from .errors import ConfigError

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
                              f"({', '.join(PRIORS)}) nor an existing JSON file")
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
