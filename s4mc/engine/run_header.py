"""The run header: one block at the start of a run that states the protocol it follows.

Users compare their mIoU with a paper's; most gaps come from a different global batch,
LR, split or evaluation protocol, so the header states each of these as the run
resolved it (after LR scaling, with the image counts of the split lists actually
loaded) next to what the config's `recipe` says was published. Rank 0 logs the block
and stores the same facts under "protocol" in the run's environment.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
from pathlib import Path

import torch

from s4mc.config import load_config
from s4mc.data.datasets import default_unlabeled_list, read_split
from s4mc.data.loaders import check_n_sup
from s4mc.engine.optim import build_optimizer, resolve_accumulate
from s4mc.errors import DataError, S4MCError, clean_message
from s4mc.evaluation import training_protocols
from s4mc.methods import METHODS, describe_method
from s4mc.models import build_model
from s4mc.runtime import resolve_amp, update_environment
from s4mc.terms import active_terms

DATASET_NAMES = {"pascal": "VOC", "cityscapes": "Cityscapes", "toy": "toy shapes", "custom": "custom"}


def count_images(loader) -> int | None:
    """Images behind a loader, before any repetition (the labeled set is repeated to the
    unlabeled length) or seeding wrapper: the length of the split list as loaded."""
    if loader is None:
        return None
    dataset = loader.dataset
    while hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return len(dataset)


def count_list_file(path) -> int | None:
    """Entries of a split list (non-empty, non-comment lines), or None when it cannot be read:
    the count the loaders would load, for a header built before (or without) them."""
    if not path:
        return None
    try:
        return len(read_split(path))
    except DataError:
        return None


def _unlabeled_list(ds: dict) -> str:
    """dataset.train.unlabeled_list, or the loaders' implied unlabeled.txt beside labeled.txt
    (DataError when there is none)."""
    return ds["train"]["unlabeled_list"] or str(default_unlabeled_list(ds["train"]["data_list"]))


def build_run_header(cfg: dict, *, world_size: int, optimizer: torch.optim.Optimizer, iters_per_epoch: int,
                     labeled_images: int | None, unlabeled_images: int | None, val_images: int | None,
                     amp_dtype: torch.dtype | None, channels_last: bool, accumulate: int | None = None) -> dict:
    """The protocol facts of a run, JSON-able (see `format_run_header` for the text form).

    iters_per_epoch counts micro-batches (loader steps); optimizer steps per epoch are
    that divided by the accumulation. The LRs are the optimizer's groups' `initial_lr`:
    the base of the poly schedule after `trainer.lr_scaling`.
    """
    ds, tr, recipe = cfg["dataset"], cfg["trainer"], cfg["recipe"]
    sup_only = tr["mode"] == "sup"
    if accumulate is None:
        accumulate = resolve_accumulate(cfg, world_size)
    per_process = {"labeled": ds["batch_size"], "unlabeled": 0 if sup_only else ds["batch_size"]}
    global_batch = {k: v * world_size * accumulate for k, v in per_process.items()}
    steps_per_epoch = iters_per_epoch // accumulate
    total_steps = tr["epochs"] * steps_per_epoch
    if tr["max_iters"]:
        total_steps = min(total_steps, tr["max_iters"])  # counts optimizer steps, as state.iteration does
    unsup = tr["unsupervised"]
    # Counts: the loaded datasets when the caller has them; else the split files; else the
    # config's own statement (dataset.n_sup). The header says which, since only the first
    # two are facts about the data on disk.
    counted_from = "split lists as loaded"
    if labeled_images is None:
        labeled_images = count_list_file(ds["train"].get("data_list"))
        if not sup_only:
            try:
                unlabeled_images = count_list_file(_unlabeled_list(ds))
            except DataError:
                unlabeled_images = None
        counted_from = "split files"
        if labeled_images is None:
            labeled_images = ds["n_sup"]
            counted_from = ("labeled from dataset.n_sup, its split file not found" if unlabeled_images is None
                            else "split files; labeled from dataset.n_sup, its split file not found")
    facts = {
        "dataset": {
            "name": recipe["dataset"] or DATASET_NAMES.get(ds["type"], ds["type"]),
            "type": ds["type"],
            "labeled_images": labeled_images,
            "unlabeled_images": None if sup_only else unlabeled_images,
            "val_images": val_images,
            "counted_from": counted_from,
            "n_sup": ds["n_sup"],
            "labeled_list": ds["train"]["data_list"],
            "unlabeled_list": None if sup_only else ds["train"]["unlabeled_list"],
        },
        "batch": {
            "per_process": per_process,
            "world_size": world_size,
            "accumulate": accumulate,
            "global": global_batch,
            "recipe_global": dict(recipe["global_batch"]),
        },
        "lr": {
            "groups": {group.get("name", str(i)): group["initial_lr"] for i, group in
                       enumerate(optimizer.param_groups)},
            "scaling": tr["lr_scaling"],
            "schedule": f"{tr['lr_scheduler']['mode']}, power {tr['lr_scheduler']['kwargs']['power']}",
        },
        "schedule": {
            "epochs": tr["epochs"],
            "supervised_warmup_epochs": tr["epochs"] if sup_only else tr["sup_only_epoch"],
            "optimizer_steps_per_epoch": steps_per_epoch,
            "optimizer_steps_total": total_steps,
            "max_iters": tr["max_iters"],
        },
        "method": {
            "name": tr["method"],
            # The method's own words (its `describe`), with the active terms' (s4mc/methods/base.py).
            "description": None if sup_only else describe_method(cfg),
            # The method's own settings block (`trainer.<name>`), when it has one.
            "settings": dict(tr[tr["method"]]) if METHODS[tr["method"]].schema and not sup_only else None,
            "terms": list(active_terms(cfg)) if not sup_only else [],
            "mode": tr["mode"],
            "mixing": None if sup_only else unsup["mixing"],
            "refine": False if sup_only else unsup["refine"],
            "neighborhood_size": unsup["neighborhood_size"],
            "num_neighbors": unsup["num_neighbors"],
            "indicator": unsup["indicator"],
            "strong_aug": False if sup_only else unsup["strong_aug"],
            "teacher_start": None if sup_only else tr["teacher_start"],
        },
        # One entry per protocol training runs (s4mc.evaluation.training_protocols); the first
        # selects best.pth, as in results.json's "selected_by" and eval.py's default.
        "evaluation": [] if not tr["eval_on"] else [
            _protocol_facts(cfg, mode, selects_best=i == 0) for i, mode in enumerate(training_protocols(cfg))],
        "start": starting_point(cfg),
        "precision": {
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "off",
            "channels_last": bool(channels_last),
            "compile": bool(tr["compile"]),
        },
        "target": {"published_miou": recipe["published_miou"], "source": recipe["source"]},
    }
    facts["batch"]["warning"] = batch_warning(facts)
    return facts


def _protocol_facts(cfg: dict, mode: str, *, selects_best: bool) -> dict:
    ds, ev, tr = cfg["dataset"], cfg["evaluation"], cfg["trainer"]
    return {
        "mode": mode,
        "scales": list(ev["scales"]),
        "flip": ev["flip"],
        "crop_size": _crop(ev["crop_size"] or ds["val"]["crop"]["size"]) if mode != "whole" else None,
        "pad_label": ds["val"]["crop"]["pad_label"] if mode == "center_crop" else None,
        "refine": ev["refine"],
        "every_epochs": tr["eval_every"],
        "selects_best": selects_best,
    }


def starting_point(cfg: dict) -> dict:
    """Where the weights start: `kind` file, torchvision, toy, random, or checkpoint
    (saver.pretrain), with a warning for a random start on a dataset other than the toy."""
    pretrained, ds_type = cfg["net"]["encoder"]["pretrained"], cfg["dataset"]["type"]
    if cfg["saver"]["pretrain"]:
        start = {"kind": "checkpoint", "path": cfg["saver"]["pretrain"]}
    elif pretrained in ("torchvision", "toy"):
        start = {"kind": pretrained, "path": None}
    elif pretrained:
        start = {"kind": "file", "path": pretrained}
    else:
        start = {"kind": "random", "path": None}
    start["encoder"] = cfg["net"]["encoder"]["type"]
    start["warning"] = None
    if start["kind"] == "random" and ds_type != "toy":
        start["warning"] = (
            f"the {start['encoder']} encoder starts from random weights (net.encoder.pretrained is null) on the "
            f"{DATASET_NAMES.get(ds_type, ds_type)} dataset: expect a far lower mIoU than from ImageNet weights. "
            f"Set net.encoder.pretrained to a weights file, or to torchvision with net.encoder.stem: torchvision "
            f"(README, 'Training on real data')")
    return start


def _start_text(start: dict) -> str:
    kind, encoder = start["kind"], start["encoder"]
    if kind == "checkpoint":
        return f"checkpoint {start['path']} (saver.pretrain: the whole student)"
    if kind == "file":
        return f"file {start['path']} ({encoder} encoder)"
    if kind == "torchvision":
        return f"torchvision ImageNet weights ({encoder} encoder)"
    if kind == "toy":
        return "toy: data/toy_pretrain/encoder.pth (the toy's stand-in for ImageNet weights)"
    return f"random: no pretrained weights ({encoder} encoder)"


def _recipe_batch(facts: dict) -> dict | None:
    """The recipe's global batch as it applies to this run: a supervised-only run draws no
    unlabeled images, so only the labeled half of a semi-supervised recipe can match."""
    recipe = facts["batch"]["recipe_global"]
    if recipe.get("labeled") is None:
        return None
    return {"labeled": recipe["labeled"],
            "unlabeled": 0 if facts["method"]["mode"] == "sup" else recipe["unlabeled"]}


def batch_warning(facts: dict) -> str | None:
    """One line when the run's global batch is not the recipe's and nothing compensates
    (trainer.lr_scaling none): the most common reason a run lands below the published mIoU."""
    b, wanted = facts["batch"], _recipe_batch(facts)
    run = b["global"]
    if wanted is None or facts["lr"]["scaling"] == "linear" or run == wanted:
        return None
    per = b["per_process"]["labeled"]
    return (f"global batch {_batch_text(run)} ({per} per process × {b['world_size']} process(es) × accumulate "
            f"{b['accumulate']}) differs from the recipe's {_batch_text(wanted)}, and trainer.lr_scaling is "
            f"none; to match the recipe set trainer.accumulate (auto, or so that processes × dataset.batch_size × "
            f"accumulate = {wanted['labeled']}), or set trainer.lr_scaling: linear to scale the LR to this batch")


def _crop(size) -> list[int]:
    return [size, size] if isinstance(size, int) else list(size)


def _batch_text(batch: dict) -> str:
    return f"{batch['labeled']} + {batch['unlabeled']}"


def _count(n) -> str:
    return "?" if n is None else f"{n:,}"


def format_run_header(facts: dict) -> str:
    """The header block, one fact per line."""
    d, b, lr, s, m, p, t = (facts[k] for k in ("dataset", "batch", "lr", "schedule", "method", "precision", "target"))
    data = f"{d['name']}, {_count(d['labeled_images'])} labeled"
    if d["unlabeled_images"] is not None:
        data += f" / {_count(d['unlabeled_images'])} unlabeled"
    data += f" ({d.get('counted_from', 'split lists as loaded')})"
    if d["val_images"] is not None:
        data += f", {d['val_images']:,} val images"

    per = b["per_process"]
    batch = (f"{per['labeled']} labeled + {per['unlabeled']} unlabeled per process × {b['world_size']} "
             f"process(es) × accumulate {b['accumulate']} = global {_batch_text(b['global'])}")
    recipe = _recipe_batch(facts)
    if recipe is not None:
        batch += f"; recipe {_batch_text(recipe)}" + ("" if recipe == b["global"] else " (DIFFERS)")

    lrs = ", ".join(f"{name} {value:.4g}" for name, value in lr["groups"].items())
    lr_text = f"{lrs} ({lr['schedule']}, lr_scaling {lr['scaling']})"

    sched = (f"{s['epochs']} epochs ({s['supervised_warmup_epochs']} supervised-only) × "
             f"{s['optimizer_steps_per_epoch']:,} optimizer steps = {s['epochs'] * s['optimizer_steps_per_epoch']:,} steps")
    if s["max_iters"]:
        sched += f"; trainer.max_iters stops at {s['optimizer_steps_total']:,}"

    if m["mode"] == "sup":
        method = "supervised only"
    else:
        method = m["description"]
        if m.get("teacher_start") == "all":  # the release's start (parameters only) goes unsaid
            method += ", teacher starts as the student with its BN statistics"

    evals = []
    for e in facts["evaluation"]:
        text = {"whole": "whole image", "center_crop": "centre crop", "sliding": "sliding window"}[e["mode"]]
        text = f"{e['mode']} ({text}"
        if e["crop_size"]:
            text += f" {e['crop_size'][0]}×{e['crop_size'][1]}"
        if e["pad_label"] is not None:
            text += f", padding labelled {e['pad_label']}"
        scales = e["scales"]
        text += ", single scale" if scales == [1.0] else f", scales {scales}"
        text += ", flip" if e["flip"] else ""
        text += ", also refined" if e["refine"] else ""
        text += ")"
        if e["selects_best"]:
            text += f" every {e['every_epochs']} epoch(s), selects best.pth"
        else:
            text = "logged beside it: " + text
        evals.append(text)
    evaluation = "; ".join(evals) if evals else "off (trainer.eval_on: false)"

    precision = (f"amp {p['amp']}, channels_last {'on' if p['channels_last'] else 'off'}, "
                 f"compile {'on' if p['compile'] else 'off'}")
    if t["published_miou"] is not None:
        target = f"{t['published_miou']:.2f} mIoU ({t['source'] or 'source not given'})"
    else:
        target = f"no published number ({t['source'] or 'recipe.published_miou not set in the config'})"

    rows = [("dataset", data), ("batch", batch), ("lr", lr_text), ("schedule", sched), ("method", method),
            ("start", _start_text(facts["start"])) if "start" in facts else None,
            ("evaluation", evaluation), ("precision", precision), ("target", target)]
    rows = [row for row in rows if row is not None]
    return "run protocol:\n" + "\n".join(f"  {name:<12}{text}" for name, text in rows)


def header_warnings(facts: dict) -> list[str]:
    """The warnings that follow the block: batch against the recipe, a random start."""
    return [w for w in (facts["batch"].get("warning"), (facts.get("start") or {}).get("warning")) if w]


def announce_run_header(facts: dict, run_dir: str | Path | None = None,
                        logger: logging.Logger | None = None) -> None:
    """The start of a run (rank 0 only): the header block, the batch warning, environment.json."""
    logger = logger or logging.getLogger("s4mc")
    logger.info("%s", format_run_header(facts))
    for warning in header_warnings(facts):
        # The log format has no level name; the prefix makes the line findable (grep warning).
        logger.warning("warning: %s", warning)
    if run_dir is not None:
        update_environment(run_dir, {"protocol": facts})


def preview_run_header(cfg: dict, world_size: int = 1, device: str = "cuda") -> dict:
    """The header a run of `cfg` on `world_size` processes would log, without its images.

    The counts come from the split files (they must exist: the step counts depend on them), the
    LRs from the optimizer that training builds, on a model built without its pretrained weights
    (they do not change the groups). AMP and channels_last resolve as training would on `device`.
    """
    ds, tr = cfg["dataset"], cfg["trainer"]
    bs = ds["batch_size"]
    # read_split raises the loaders' own errors (file named, with the fetch hint for VOC/Cityscapes).
    labeled = len(read_split(ds["train"]["data_list"]))
    check_n_sup(cfg, ds["train"]["data_list"], labeled)  # the error training would stop with
    if tr["mode"] == "sup" and tr["sup_epoch_length"] == "labeled":
        # Supervised only: the labeled set alone, repeated up to one global batch when smaller.
        epoch_images = max(labeled, bs * world_size)
    else:
        unlabeled_list = _unlabeled_list(ds)  # the loaders' own error when none is set or implied
        # As build_train_loaders: the labeled set is repeated to the unlabeled length.
        epoch_images = max(labeled, len(read_split(unlabeled_list)))
    # Each rank takes ceil(n / world) indices and drops its last incomplete batch.
    iters_per_epoch = math.ceil(epoch_images / world_size) // bs
    net = copy.deepcopy(cfg["net"])
    net["encoder"]["pretrained"] = None
    optimizer = build_optimizer(build_model(net), cfg, world_size)
    val = count_list_file(ds["val"].get("data_list")) if tr["eval_on"] else None
    channels_last = tr["channels_last"] if tr["channels_last"] != "auto" else device == "cuda"
    # Counts left to build_run_header, which reads the same split files and says so.
    return build_run_header(cfg, world_size=world_size, optimizer=optimizer, iters_per_epoch=iters_per_epoch,
                            labeled_images=None, unlabeled_images=None, val_images=val,
                            amp_dtype=resolve_amp(tr["amp"], torch.device(device)), channels_last=channels_last)


def main(argv: list[str] | None = None) -> int:
    """`python -m s4mc.engine.run_header --config C --world-size N`: the header before launching."""
    parser = argparse.ArgumentParser(
        prog="python -m s4mc.engine.run_header",
        description="Print the protocol header a training run of this config would log (dataset and split "
        "counts, global batch against the recipe's, LR per group, steps, evaluation, target), without "
        "loading images or starting a run. Only the split list files need to exist.")
    parser.add_argument("--config", required=True, help="YAML config (see experiments/)")
    parser.add_argument("--world-size", type=int, default=1, help="number of training processes (GPUs), default 1")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config keys as train_semi.py does, e.g. dataset.batch_size=4")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="where the run would train: sets what amp/channels_last 'auto' become (default cuda)")
    parser.add_argument("--json", action="store_true", help="print the facts as JSON instead of the block")
    args = parser.parse_args(argv)
    if args.world_size < 1:
        parser.error(f"--world-size must be at least 1, got {args.world_size}")
    try:
        facts = preview_run_header(load_config(args.config, args.opts), args.world_size, args.device)
    except S4MCError as exc:
        print(f"error: {clean_message(exc)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        print(format_run_header(facts))
        for warning in header_warnings(facts):
            print(f"warning: {warning}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
