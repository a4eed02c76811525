"""One YAML file drives a run: loading, defaults, validation, aliases and overrides.

`load_config(path, overrides)` returns a plain nested dict in which every key of the
schema exists (`full_schema()`: the core `SCHEMA` below and each plug-in's own block),
every value has been type-checked, the release's (U2PL/S4MC) key names have been mapped
to ours, and every path is absolute.

Relative paths resolve against the repository root (the folder holding
`train_semi.py`), after `~` and environment variables are expanded. A config
written for the original release keeps its paths relative to its own folder:
set `path_base: config`, which is also the default for a file that uses any of
the release's key names.
"""

from __future__ import annotations

import copy
import difflib
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from s4mc import REPO_ROOT
from s4mc.errors import ConfigError
from s4mc.methods import METHODS
from s4mc.schema import NONE, NUM, REQUIRED, Key
from s4mc.schema import key as _k
from s4mc.terms import TERMS, active_terms


# Stands for `trainer.terms`, whose keys are term names and whose schemas come from s4mc.terms.
TERMS_BLOCK = object()

# Blocks whose absence means "off" (the release switches them on by presence); a term's legacy
# block (`trainer.contrastive`) is one too.
OPTIONAL_BLOCKS = {("net", "aux_loss")}

SCHEMA: dict = {
    "seed": _k(0, int),
    "output_dir": _k("runs", str, path=True),
    "path_base": _k("auto", str, choices=("auto", "repo", "config")),
    "dataset": {
        "type": _k(REQUIRED, str, choices=("pascal", "cityscapes", "custom", "toy", "coco", "ade20k")),
        "ignore_index": _k(255, int),
        "mean": _k([123.675, 116.28, 103.53], list),
        "std": _k([58.395, 57.12, 57.375], list),
        "batch_size": _k(4, int),
        "n_sup": _k(None, int, NONE),
        "workers": _k(2, int),
        "class_names": _k(None, list, NONE),
        "palette": _k(None, list, NONE),
        "image_dir": _k(None, str, NONE),
        "mask_dir": _k(None, str, NONE),
        "image_suffix": _k(None, str, NONE),  # null: any common extension, as `splits make` detects
        "mask_suffix": _k(".png", str),
        "train": {
            "data_root": _k(REQUIRED, str, path=True),
            "data_list": _k(REQUIRED, str, path=True),
            "unlabeled_list": _k(None, str, NONE, path=True),
            "flip": _k(True, bool),
            "rand_resize": _k([0.5, 2.0], list, NONE),
            "crop": {
                "type": _k("rand", str, choices=("rand", "center", "none")),
                "size": _k([513, 513], list),
                "pad_label": _k(255, int),
            },
            "strong_aug": {
                "color_jitter": _k([0.5, 0.5, 0.5, 0.25], list),
                "jitter_prob": _k(0.8, *NUM),
                "grayscale_prob": _k(0.2, *NUM),
                "blur_prob": _k(0.5, *NUM),
                "blur_sigma": _k([0.1, 2.0], list),
            },
        },
        "val": {
            "data_root": _k(REQUIRED, str, path=True),
            "data_list": _k(REQUIRED, str, path=True),
            "crop": {
                # center: training selects best.pth by U2PL's centre-crop mIoU and logs
                # evaluation.mode's beside it; none: evaluation.mode alone.
                "type": _k("none", str, choices=("center", "none")),
                "size": _k([513, 513], list),
                "pad_label": _k(255, int),
            },
        },
    },
    "trainer": {
        "epochs": _k(REQUIRED, int),
        "sup_only_epoch": _k(1, int),
        # What the teacher takes from the student when the semi phase starts (docs/method.md step 11):
        # "parameters" (the release) keeps the teacher's own BN statistics, which warmed up on its
        # *initial* weights; "all" also copies the student's BN buffers, so the first pseudo-labels
        # come from exactly the warmed-up student.
        "teacher_start": _k("parameters", str, choices=("parameters", "all")),
        "eval_on": _k(True, bool),
        "eval_every": _k(1, int),
        "log_every": _k(20, int),
        "save_every": _k(0, int),
        "image_every": _k(500, int),
        "max_iters": _k(None, int, NONE),
        "mode": _k("semi", str, choices=("semi", "sup")),
        # The training method, a name in s4mc.methods.METHODS (checked once that registry is known).
        "method": _k("mean_teacher", str),
        # With mode: sup, an epoch is one pass over the labeled list (U2PL's train_sup), or as many
        # iterations as a semi-supervised epoch (the labeled list repeated to the unlabeled list's
        # length, as the semi loop does): the same budget and schedule, for a fair comparison.
        "sup_epoch_length": _k("labeled", str, choices=("labeled", "unlabeled")),
        "amp": _k("auto", str, choices=("auto", "bf16", "fp16", "off")),
        "channels_last": _k("auto", str, bool, choices=("auto", True, False)),
        "compile": _k(False, bool),
        "cudnn_benchmark": _k(True, bool),
        "deterministic": _k(False, bool),
        "lr_scaling": _k("none", str, choices=("none", "linear")),
        # Micro-batches per optimizer step: an int >= 1, or "auto" (the recipe's global batch,
        # recipe.global_batch, over processes x dataset.batch_size). Epochs, the LR schedule and the
        # EMA count optimizer steps, so 1 GPU with accumulate 4 follows 4 GPUs' schedule.
        "accumulate": _k(1, int, str),
        "reference_batch": _k(16, int),
        "head_lr_mult": _k(None, *NUM, NONE),
        "optimizer": {
            # adamw: UniMatch V2's optimizer (set weight_decay: 0.01, its value); momentum and
            # nesterov are SGD's, betas AdamW's.
            "type": _k("SGD", str, choices=("SGD", "adamw")),
            "kwargs": {
                "lr": _k(0.001, *NUM),
                "momentum": _k(0.9, *NUM),
                "weight_decay": _k(0.0001, *NUM),
                "nesterov": _k(False, bool),
                "betas": _k([0.9, 0.999], list),
            },
            "fused": _k("auto", str, bool, choices=("auto", True, False)),
        },
        "lr_scheduler": {
            "mode": _k("poly", str, choices=("poly",)),
            "kwargs": {"power": _k(0.9, *NUM)},
        },
        "unsupervised": {
            "keep_percent": _k(60.0, *NUM, low=0, high=100),
            "keep_schedule": _k("epoch", str, choices=("epoch", "iteration")),
            "mixing": _k("cutmix", str, choices=("cutmix", "classmix", "cutout", "none")),
            "mix_prob": _k(0.5, *NUM, low=0, high=1),
            # The release flipped one coin per step for the whole batch; "sample" flips one per image.
            "mix_gate": _k("batch", str, choices=("batch", "sample")),
            "refine": _k(True, bool),
            "neighborhood_size": _k(4, int, choices=(4, 8)),
            "num_neighbors": _k(1, int),
            "indicator": _k("margin", str, choices=("margin", "confidence", "entropy")),
            "neighbor_prior": _k("auto", str, list, NONE),
            "unsup_weight": _k(1.0, *NUM),
            "strong_aug": _k(False, bool),
        },
        # Additive loss terms other than the contrastive one: trainer.terms.<name>, each validated by
        # the schema its s4mc.terms registration gives.
        "terms": TERMS_BLOCK,
    },
    "criterion": {
        "type": _k("CELoss", str, choices=("CELoss", "ohem")),
        "kwargs": {
            "use_weight": _k(False, bool),
            "thresh": _k(0.7, *NUM),
            "min_kept": _k(100000, int),
        },
    },
    "net": {
        "num_classes": _k(REQUIRED, int),
        "sync_bn": _k(True, bool),
        "ema_decay": _k(0.99, *NUM),
        "encoder": {
            "type": _k("resnet101", str),
            "stem": _k("deep", str, choices=("deep", "torchvision")),
            "pretrained": _k(None, str, NONE),
            "kwargs": {
                "multi_grid": _k(True, bool),
                "zero_init_residual": _k(True, bool),
                "fpn": _k(True, bool),
                "replace_stride_with_dilation": _k([False, True, True], list),
                "width": _k(64, int),
                # The stem max-pool's rounding; null: the stem's own (deep: true, torchvision: false).
                "ceil_mode": _k(None, bool, NONE),
            },
        },
        "decoder": {
            "type": _k("deeplabv3_plus", str),
            "kwargs": {
                "inner_planes": _k(256, int),
                "dilations": _k([12, 24, 36], list),
                "low_conv_planes": _k(256, int),
                "rep_head": _k(True, bool),
            },
        },
        "aux_loss": {
            "aux_plane": _k(1024, int),
            "loss_weight": _k(0.4, *NUM),
        },
    },
    "saver": {
        # Relative to the run directory (output_dir/name); an absolute path is used as is.
        "checkpoint_dir": _k("checkpoints", str),
        "pretrain": _k("", str),
        "auto_resume": _k(False, bool),
    },
    "evaluation": {
        "mode": _k("whole", str, choices=("whole", "center_crop", "sliding")),
        "scales": _k([1.0], list),
        "flip": _k(False, bool),
        "stride_rate": _k(2 / 3, *NUM),
        "crop_size": _k(None, list, int, NONE),
        "refine": _k(False, bool),
        "batch_size": _k(1, int),
        # A study JSON written by benchmarks/variants.py: the run ends with one line comparing its
        # mIoU with the study's rows at the same budget (the toy config ships one).
        "compare_with": _k(None, str, NONE, path=True),
    },
    # What the config reproduces: stated in the run header (and environment.json) so a run can be
    # compared with its target. Facts only; nothing here changes how the run trains.
    "recipe": {
        "dataset": _k(None, str, NONE),  # e.g. "VOC classic"; the header falls back to dataset.type
        "global_batch": {"labeled": _k(None, int, NONE), "unlabeled": _k(None, int, NONE)},
        "published_miou": _k(None, *NUM, NONE),
        "source": _k(None, str, NONE),
    },
}

# The release's names (and a few of U2PL's) -> ours, by dotted path.
ALIASES: dict[str, str] = {
    "trainer.unsupervised.neigborhood_size": "trainer.unsupervised.neighborhood_size",
    "trainer.unsupervised.n_neigbors": "trainer.unsupervised.num_neighbors",
    "trainer.unsupervised.drop_percent": "trainer.unsupervised.keep_percent",
    "trainer.unsupervised.apply_aug": "trainer.unsupervised.mixing",
    "saver.snapshot_dir": "saver.checkpoint_dir",
    "dataset.ignore_label": "dataset.ignore_index",
}
# Values the release wrote that mean one of ours.
VALUE_ALIASES: dict[str, dict] = {
    "dataset.type": {"pascal_semi": "pascal", "cityscapes_semi": "cityscapes"},
    "trainer.unsupervised.mixing": {"": "none", None: "none", False: "none"},
    # YAML 1.1 reads a bare `off` as false.
    "trainer.amp": {False: "off", None: "off"},
    "trainer.lr_scaling": {False: "none", None: "none"},
    "trainer.optimizer.type": {"AdamW": "adamw", "sgd": "SGD"},
}
# Release keys that we accept and ignore, because they had no effect or are
# implied elsewhere. A load lists those it met in one warning (better than a silent drop).
IGNORED_KEYS = {
    "main_mode.eval": "the release's evaluate-only switch; evaluate with eval.py",
    "main_mode.compare": "the release's evaluate-only switch; evaluate with eval.py",
    "dataset.noise_std": "read by no code path of the release",
    "dataset.train.scale": "no effect in the release either",
    "dataset.val.scale": "no effect in the release either",
    "dataset.train.GaussianBlur": "use dataset.train.strong_aug",
    "trainer.unsupervised.TTA": "test-time augmentation is evaluation.flip / evaluation.scales",
    "trainer.unsupervised.use_teacher": "the teacher is always used",
    "net.encoder.kwargs.norm_layer": "BatchNorm/SyncBatchNorm follows net.sync_bn",
    "net.decoder.kwargs.num_classes": "taken from net.num_classes",
    "net.decoder.kwargs.in_planes": "taken from the encoder",
    "net.aux_loss.use_auxloss": "presence of net.aux_loss switches the aux head on",
}


def _flatten_keys(schema: dict, prefix: str = "") -> list[str]:
    out = []
    for name, sub in schema.items():
        dotted = f"{prefix}{name}"
        out.append(dotted)
        if isinstance(sub, dict):
            out.extend(_flatten_keys(sub, dotted + "."))
    return out


def full_schema() -> dict:
    """SCHEMA with every registered plug-in's own block: `trainer.<method>` for a method that
    has settings, `trainer.<legacy key>` for a term that also answers to one. Built on each
    load, so a plug-in registered after this module was imported is validated too."""
    trainer = dict(SCHEMA["trainer"])
    for name, cls in METHODS.items():
        if cls.schema:
            trainer[name] = cls.schema
    for spec in TERMS.values():
        if spec.legacy_key:
            trainer[spec.legacy_key] = spec.schema
    return {**SCHEMA, "trainer": trainer}


def _optional_blocks() -> set:
    return OPTIONAL_BLOCKS | {("trainer", spec.legacy_key) for spec in TERMS.values() if spec.legacy_key}


def _suggest(dotted: str) -> str:
    candidates = _flatten_keys(full_schema()) + list(ALIASES)
    parent = dotted.rsplit(".", 1)[0] + "." if "." in dotted else ""
    siblings = [c for c in candidates if c.startswith(parent) and "." not in c[len(parent):]]
    close = difflib.get_close_matches(dotted, siblings or candidates, n=1, cutoff=0.5)
    if not close:
        close = difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.6)
    return f"; did you mean '{ALIASES.get(close[0], close[0])}'?" if close else ""


def _schema_at(dotted: str):
    node: Any = full_schema()
    for part in dotted.split("."):
        if node is TERMS_BLOCK:
            node = {name: spec.schema for name, spec in TERMS.items()}
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _canonical(dotted: str) -> str:
    """Map a dotted key through ALIASES, also where an alias is a prefix."""
    for old, new in ALIASES.items():
        if dotted == old or dotted.startswith(old + "."):
            return new + dotted[len(old):]
    return dotted


def _rename_aliases(raw: dict, where: str, prefix: str = "") -> tuple[dict, bool]:
    """Return a copy of `raw` with the release's key names replaced by ours."""
    out: dict = {}
    used_alias = False
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: key {key!r} under '{prefix or '<top>'}' is not a string")
        dotted = _canonical(prefix + key)
        used_alias |= dotted != prefix + key
        name = dotted.rsplit(".", 1)[-1]
        if isinstance(value, dict):
            value, sub_alias = _rename_aliases(value, where, dotted + ".")
            used_alias |= sub_alias
        if name in out:
            raise ConfigError(f"{where}: '{dotted}' is given twice (once under its old name)")
        out[name] = value
    return out, used_alias


# Ignored switches that would change what a run does if they were on: refused when true.
REFUSED_WHEN_ON = {"main_mode.eval", "main_mode.compare"}


def _take_ignored(dotted: str, value, where: str, ignored: list[str]) -> bool:
    """Record `dotted` (or every key of the block it names) as ignored; False if it is unknown."""
    if dotted in IGNORED_KEYS:
        if dotted in REFUSED_WHEN_ON and value:
            raise ConfigError(f"{where}: '{dotted}: {value!r}' is not supported here ({IGNORED_KEYS[dotted]})")
        ignored.append(dotted)
        return True
    if isinstance(value, dict) and any(k.startswith(dotted + ".") for k in IGNORED_KEYS):
        for key, sub in value.items():
            if not _take_ignored(f"{dotted}.{key}", sub, where, ignored):
                raise ConfigError(f"{where}: unknown key '{dotted}.{key}'{_suggest(dotted + '.' + key)}")
        return True
    return False


def _merge(schema: dict, raw: dict, where: str, prefix: str = "", ignored: list[str] | None = None) -> dict:
    """Defaults from `schema`, overridden by `raw`; unknown keys are errors, ignored ones go to `ignored`."""
    ignored = [] if ignored is None else ignored
    result: dict = {}
    for key, value in raw.items():
        dotted = prefix + key
        if key not in schema:
            if _take_ignored(dotted, value, where, ignored):
                continue
            raise ConfigError(f"{where}: unknown key '{dotted}'{_suggest(dotted)}")
    for key, sub in schema.items():
        dotted = prefix + key
        present = key in raw
        if sub is TERMS_BLOCK:
            result[key] = _merge_terms(raw.get(key), where, dotted, ignored)
            continue
        if isinstance(sub, dict):
            value = raw.get(key)
            optional = tuple(dotted.split(".")) in _optional_blocks()
            if optional and (not present or value is None or value is False):
                result[key] = None
                continue
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{dotted}' must be a mapping of keys, got {value!r}")
            result[key] = _merge(sub, value, where, dotted + ".", ignored)
            continue
        if not present:
            if sub.default is REQUIRED:
                raise ConfigError(f"{where}: required key '{dotted}' is missing")
            result[key] = copy.deepcopy(sub.default)
            continue
        result[key] = _check_value(sub, raw[key], dotted, where)
    return result


def _merge_terms(raw, where: str, dotted: str, ignored: list[str]) -> dict:
    """`trainer.terms`: one block per registered term, each merged with that term's own schema."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{dotted}' must be a mapping of term names to blocks, got {raw!r}")
    result = {}
    for name, block in raw.items():
        if name not in TERMS:
            raise ConfigError(f"{where}: unknown term '{dotted}.{name}'; registered terms: {', '.join(sorted(TERMS))}")
        if block is None or block is False:
            continue
        if block is True:
            block = {}
        if not isinstance(block, dict):
            raise ConfigError(f"{where}: '{dotted}.{name}' must be a mapping of keys, got {block!r}")
        result[name] = _merge(TERMS[name].schema, block, where, f"{dotted}.{name}.", ignored)
    return result


def _type_name(types: tuple) -> str:
    return " or ".join("null" if t is NONE else t.__name__ for t in types)


def _check_value(spec: Key, value, dotted: str, where: str):
    value = VALUE_ALIASES.get(dotted, {}).get(value, value) if _hashable(value) else value
    if isinstance(value, str) and (float in spec.types or int in spec.types) and _NUMBER.fullmatch(value.strip()):
        # YAML 1.1 reads 1e6 and 2e-2 (no dot) as strings; a numeric key takes them as numbers.
        number = float(value)
        value = int(number) if int in spec.types and float not in spec.types and number.is_integer() else number
    if isinstance(value, list) and list in spec.types:
        # The same inside a list ([1e39, 1, 1]); a plain integer stays an int (crop sizes).
        value = [(int(v) if re.fullmatch(r"[-+]?\d+", v.strip()) else float(v))
                 if isinstance(v, str) and _NUMBER.fullmatch(v.strip()) else v for v in value]
    ok = any(
        (t is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (t is int and isinstance(value, int) and not isinstance(value, bool))
        or (t not in (int, float) and isinstance(value, t))
        for t in spec.types
    )
    if not ok:
        raise ConfigError(
            f"{where}: '{dotted}' must be {_type_name(spec.types)}, got {value!r} ({type(value).__name__})"
        )
    if float in spec.types and type(value) is int:
        value = float(value)
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(
            f"{where}: '{dotted}' = {value!r} is not one of {list(spec.choices)}"
            + _close_choice(value, spec.choices)
        )
    if isinstance(value, (int, float)) and not isinstance(value, bool) and (
            (spec.low is not None and not value >= spec.low) or (spec.high is not None and not value <= spec.high)):
        bounds = f"[{'-inf' if spec.low is None else spec.low}, {'inf' if spec.high is None else spec.high}]"
        raise ConfigError(f"{where}: '{dotted}' = {value!r} must lie in {bounds}")
    return value


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _hashable(value) -> bool:
    try:
        hash(value)
        return True
    except TypeError:
        return False


def _close_choice(value, choices) -> str:
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, [c for c in choices if isinstance(c, str)], n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b.c=value`, parsing the value as YAML (so 3 is int, [1, 2] a list)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': cannot parse value {raw!r}: {exc}") from None
    return key, value


def _apply_override(raw: dict, key: str, value, where: str) -> None:
    dotted = _canonical(key)
    if _schema_at(dotted) is None and dotted not in IGNORED_KEYS and not any(
            k.startswith(dotted + ".") for k in IGNORED_KEYS):
        raise ConfigError(f"{where}: unknown key '{key}'{_suggest(dotted)}")
    spec = _schema_at(dotted)
    if isinstance(spec, Key):
        value = _check_value(spec, value, dotted, where)  # so a bad value names the override
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _resolve_paths(cfg: dict, schema: dict, base: Path) -> None:
    for key, sub in schema.items():
        if cfg.get(key) is None or sub is TERMS_BLOCK:
            continue
        if isinstance(sub, dict):
            _resolve_paths(cfg[key], sub, base)
        elif sub.path and isinstance(cfg[key], str) and cfg[key]:
            cfg[key] = resolve_path(cfg[key], base)


def resolve_path(text: str, base: Path | str = REPO_ROOT) -> str:
    """Expand `~` and `$VARS`, then make a relative path absolute against `base`."""
    expanded = os.path.expanduser(os.path.expandvars(text))
    path = Path(expanded)
    if not path.is_absolute():
        path = Path(base) / path
    return str(path.resolve())


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None, *, data: dict | None = None,
                where: str | None = None) -> dict:
    """Load, alias, override, validate and resolve one config.

    `path` is a YAML file (or None when `data` is given directly, as tests do).
    `overrides` are `a.b.c=value` strings, applied after aliasing and before
    validation, so an override may also use a release key name. `where` names the source
    in errors when it is not `path` (a checkpoint's config, say).
    """
    where = where or (str(path) if path is not None else "<config>")
    raw = read_yaml(path) if data is None else copy.deepcopy(data)
    raw, used_alias = _rename_aliases(raw, where)
    for item in overrides or []:
        key, value = parse_override(item)
        _apply_override(raw, key, value, f"{where} (override '{item}')")
    ignored: list[str] = []
    schema = full_schema()
    cfg = _merge(schema, raw, where, ignored=ignored)
    if ignored:
        logging.getLogger("s4mc").warning(
            "%s: ignoring %d release key(s): %s", where, len(ignored),
            "; ".join(f"{key} ({IGNORED_KEYS[key]})" for key in ignored))
    _check_semantics(cfg, where)

    base_choice = cfg["path_base"]
    if base_choice == "auto":
        base_choice = "config" if used_alias and path is not None else "repo"
    base = Path(path).resolve().parent if base_choice == "config" and path is not None else REPO_ROOT
    cfg["path_base"] = base_choice
    _resolve_paths(cfg, schema, base)
    if not cfg["dataset"]["train"]["unlabeled_list"]:
        labeled = cfg["dataset"]["train"]["data_list"]
        if os.path.basename(labeled) == "labeled.txt":
            cfg["dataset"]["train"]["unlabeled_list"] = os.path.join(os.path.dirname(labeled), "unlabeled.txt")
    pretrained = cfg["net"]["encoder"]["pretrained"]
    if pretrained and pretrained not in ("torchvision", "toy"):  # named starting points, not paths
        cfg["net"]["encoder"]["pretrained"] = resolve_path(pretrained, base)
    prior = cfg["trainer"]["unsupervised"]["neighbor_prior"]
    if isinstance(prior, str) and prior.lower().endswith(".json"):
        cfg["trainer"]["unsupervised"]["neighbor_prior"] = resolve_path(prior, base)
    if cfg["saver"]["pretrain"]:
        cfg["saver"]["pretrain"] = resolve_path(cfg["saver"]["pretrain"], base)
    cfg["config_file"] = str(Path(path).resolve()) if path is not None else None
    return cfg


FLOAT32_MAX = 3.4028234663852886e38


def _numbers(node, key: str = ""):
    """(dotted key, value) of every int and float in a config (list items as key[i])."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _numbers(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _numbers(v, f"{key}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield key, node


def _check_semantics(cfg: dict, where: str) -> None:
    """Checks that span keys or bound numbers; each names the key."""

    def fail(key, msg):
        raise ConfigError(f"{where}: '{key}' {msg}")

    for key, value in _numbers(cfg):
        # Every number ends up in float32 (the model, the optimizer's lr): one past its range would
        # fail deep inside torch, or silently become inf.
        if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
            fail(key, f"= {value!r} is not a finite float32 number (|x| <= {FLOAT32_MAX:.3g}), which training "
                 "computes in")
    ds, tr, net = cfg["dataset"], cfg["trainer"], cfg["net"]
    if net["num_classes"] < 2:
        fail("net.num_classes", f"must be at least 2, got {net['num_classes']}")
    if ds["batch_size"] < 1:
        fail("dataset.batch_size", f"must be at least 1, got {ds['batch_size']}")
    if tr["epochs"] < 1:
        fail("trainer.epochs", f"must be at least 1, got {tr['epochs']}")
    if not 0 <= tr["sup_only_epoch"] <= tr["epochs"]:
        fail("trainer.sup_only_epoch", f"must lie in [0, trainer.epochs], got {tr['sup_only_epoch']}")
    acc = tr["accumulate"]
    if isinstance(acc, bool) or (isinstance(acc, str) and acc != "auto") or (isinstance(acc, int) and acc < 1):
        fail("trainer.accumulate", f"must be 'auto' or an integer >= 1, got {acc!r}")
    unsup = tr["unsupervised"]
    max_k = unsup["neighborhood_size"]
    if not 1 <= unsup["num_neighbors"] <= max_k:
        fail("trainer.unsupervised.num_neighbors", f"must lie in [1, {max_k}], got {unsup['num_neighbors']}")
    if tr["method"] not in METHODS:
        fail("trainer.method", f"= {tr['method']!r} is not a registered method; one of {sorted(METHODS)}")
    terms = active_terms(cfg)
    if terms and not getattr(METHODS[tr["method"]], "supports_terms", True):
        fail("trainer.method", f"= {tr['method']!r} does not take additive loss terms, but {', '.join(terms)} "
             "is switched on; remove that block or use trainer.method: mean_teacher")
    for name, block in terms.items():
        if TERMS[name].check is not None:
            TERMS[name].check(block, lambda key, msg, name=name: fail(f"trainer.terms.{name}.{key}", msg))
    method_check = getattr(METHODS[tr["method"]], "check_config", None)
    if method_check is not None:  # checks that span the method's block and others (s4mc/methods/base.py)
        method_check(cfg, fail)
    for key in ("mean", "std"):
        if len(ds[key]) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ds[key]):
            fail(f"dataset.{key}", f"must have 3 numbers (RGB), got {ds[key]}")
    for split in ("train", "val"):
        size = ds[split]["crop"]["size"]
        if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
            fail(f"dataset.{split}.crop.size", f"must be [height, width] of positive ints, got {size}")
    names = ds["class_names"]
    if names is not None and len(names) != net["num_classes"]:
        fail("dataset.class_names", f"has {len(names)} names but net.num_classes is {net['num_classes']}")
    if ds["type"] == "custom" and names is None:
        fail("dataset.class_names", "is required for a custom dataset")
    if 0 <= ds["ignore_index"] < net["num_classes"]:
        fail("dataset.ignore_index", f"= {ds['ignore_index']} collides with a class id (< {net['num_classes']})")
    if tr["optimizer"]["kwargs"]["lr"] <= 0:
        fail("trainer.optimizer.kwargs.lr", "must be positive")
    betas = tr["optimizer"]["kwargs"]["betas"]
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas):
        fail("trainer.optimizer.kwargs.betas", f"must be two numbers in [0, 1), got {betas}")
    recipe = cfg["recipe"]
    for part, size in recipe["global_batch"].items():
        if size is not None and size < 0:
            fail(f"recipe.global_batch.{part}", f"must be a number of images >= 0, got {size}")
    if recipe["published_miou"] is not None and not 0 < recipe["published_miou"] <= 100:
        fail("recipe.published_miou", f"is an mIoU in percent, in (0, 100]; got {recipe['published_miou']}")
    if cfg["criterion"]["kwargs"]["use_weight"]:
        fail("criterion.kwargs.use_weight", "= true is not implemented: the release then added a second "
             "cross-entropy weighted by a hard-coded table of 19 Cityscapes class weights; set it to false")
    if ds["train"]["crop"]["type"] != "rand":
        fail("dataset.train.crop.type", f"= {ds['train']['crop']['type']!r}: training crops are always random "
             "(rand), as in the release; other types are not implemented")


def config_from_checkpoint(saved: dict, overrides: list[str] | None = None, *, source: str = "checkpoint") -> dict:
    """The resolved config a training checkpoint carries (its `config` entry), validated again
    with `overrides` applied; errors name `source`. Its paths are absolute already; a relative
    path in an override resolves against the repository, as in any config."""
    if not isinstance(saved, dict):
        raise ConfigError(f"{source}: its 'config' entry is a {type(saved).__name__}, not a config mapping")
    data = {k: v for k, v in saved.items() if k != "config_file"}
    data["path_base"] = "repo"
    cfg = load_config(None, overrides, data=data, where=f"{source} (the config it was trained with)")
    cfg["config_file"] = saved.get("config_file")
    return cfg


def differences(saved: dict, current: dict, prefix: str = "", skip: tuple = ()) -> list[str]:
    """`key: saved value -> current value` for every key under `prefix` that differs, keys in
    `skip` (and their sub-keys) left out."""
    def flat(node, at=""):
        out = {}
        for key, value in (node or {}).items():
            if isinstance(value, dict) and value:
                out.update(flat(value, f"{at}{key}."))
            else:
                out[f"{at}{key}"] = value
        return out

    a, b = flat(saved), flat(current)
    rows = []
    for key in sorted(set(a) | set(b)):
        if not key.startswith(prefix) or any(key == k or key.startswith(k + ".") for k in skip):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            rows.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return rows


def dump_config(cfg: dict, path: str | os.PathLike) -> None:
    """Write the fully resolved config, so a run directory records what ran.

    The file loads again as a config (`config_file`, where it came from, becomes a comment)."""
    body = {k: v for k, v in cfg.items() if k != "config_file"}
    with open(path, "w", encoding="utf-8") as handle:
        if cfg.get("config_file"):
            handle.write(f"# resolved from {cfg['config_file']}\n")
        yaml.safe_dump(body, handle, sort_keys=False)
