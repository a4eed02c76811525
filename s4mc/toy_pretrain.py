"""The toy's "ImageNet": a pretrained encoder that every toy run starts from.

    python -m s4mc.toy_pretrain                 # builds data/toy_pretrain/encoder.pth (~1-2 min, 2 CPU cores)

On PASCAL VOC every S4MC row starts from ImageNet weights, so the teacher is already decent when
pseudo-labelling begins. The toy mirrors that: the encoder is first trained, with labels, on a
separate generated pool whose classes are *other* shapes (star, cross, ellipse, hexagon,
crescent) painted with colours and textures unrelated to the class (`s4mc.data.toy.PRETRAIN`).
It learns edges, corners and curvature, and nothing about the toy's target classes. Only the
encoder is kept; the decoder starts from scratch, as with ImageNet weights.

A config selects it with `net.encoder.pretrained: toy`; the training loop builds the file on first
use (like the toy dataset) and every later run, and every row of `benchmarks/variants.py`, loads
the same file. The recipe is fixed here, so the file is a function of the code alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from s4mc import REPO_ROOT
from s4mc.config import load_config
from s4mc.data.toy import PRETRAIN, generate_toy
from s4mc.engine.loop import train
from s4mc.models.weights import TOY_ENCODER_FILE, TOY_ENCODER_NAME

log = logging.getLogger("s4mc")

NAME = TOY_ENCODER_NAME  # the value of net.encoder.pretrained that selects this encoder
DEFAULT_DIR = TOY_ENCODER_FILE.parent
POOL_SEED = 1000  # generator seed of the pool: no image is shared with the toy dataset (seed 0)
RECIPE = {
    "pool_images": 800,
    "epochs": 10,  # 100 iterations each at batch 8
    "overrides": [
        "trainer.mode=sup", "trainer.sup_only_epoch=0", "trainer.sup_epoch_length=labeled", "trainer.eval_every=10",
        "trainer.image_every=0",
        "net.encoder.pretrained=null", "evaluation.compare_with=null",
        # The memory layout changes the float rounding, and so the file; pinned, the file does not
        # depend on the toy config's trainer.channels_last.
        "trainer.channels_last=false",
    ],
}


def encoder_path(folder: str | os.PathLike | None = None) -> Path:
    return Path(folder or DEFAULT_DIR) / "encoder.pth"


def pretrain_encoder(folder: str | os.PathLike | None = None, *, config: str | os.PathLike | None = None,
                     pool_images: int = RECIPE["pool_images"], epochs: int = RECIPE["epochs"],
                     size: int = 128, extra: list[str] | None = None) -> Path:
    """Generate the pool, train the toy model on it with labels, keep the encoder; return its path.

    `config` is the toy config whose model and optimiser are used (default experiments/toy/config.yaml).
    """
    folder = Path(folder or DEFAULT_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    pool = folder / "pool"
    if not (pool / "splits" / "train_all.txt").is_file():
        shutil.rmtree(pool, ignore_errors=True)
        generate_toy(pool, seed=POOL_SEED, num_train=pool_images, num_labeled=pool_images, num_val=50,
                     size=size, style=PRETRAIN)
    config = config or REPO_ROOT / "experiments" / "toy" / "config.yaml"
    work = Path(tempfile.mkdtemp(prefix=".pretrain", dir=folder))
    try:
        cfg = load_config(config, [
            *RECIPE["overrides"], f"trainer.epochs={epochs}", f"output_dir={work}",
            f"dataset.train.data_root={pool}", f"dataset.train.data_list={pool / 'splits' / 'train_all.txt'}",
            f"dataset.train.unlabeled_list={pool / 'splits' / 'train_all.txt'}",
            f"dataset.val.data_root={pool}", f"dataset.val.data_list={pool / 'splits' / 'val.txt'}",
            *(extra or [])])
        summary = train(cfg, name="pretrain")
        checkpoint = torch.load(work / "pretrain" / "checkpoints" / "latest.pth", map_location="cpu",
                                weights_only=False)
        state = {k[len("encoder."):]: v for k, v in checkpoint["model_state"].items() if k.startswith("encoder.")}
        out = encoder_path(folder)
        tmp = out.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, out)  # a killed run never leaves a half-written encoder behind
        info = {"pool_images": pool_images, "pool_seed": POOL_SEED, "epochs": epochs,
                "iterations": summary["iterations"], "pool_val_miou": summary.get("final", {}).get("miou"),
                "seconds": round(summary["seconds"], 1), "config": _shown(config)}
        (folder / "encoder.json").write_text(json.dumps(info, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _shown(path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def ensure_pretrained_encoder(cfg: dict) -> Path | None:
    """Build the toy encoder if the config asks for it (`net.encoder.pretrained: toy`) and it is missing.

    Entry points call this before training (train_semi.py: s4mc/cli.py, benchmarks), never
    `train` itself: building it is a training run of its own. In one process only; under
    torchrun or srun the CLI has rank 0 build it in a separate process while the others wait.
    """
    if cfg["net"]["encoder"].get("pretrained") != NAME:
        return None
    path = encoder_path()
    if not path.is_file():
        started = time.perf_counter()
        log.warning("net.encoder.pretrained: toy — %s is missing; pretraining it once on a separate generated "
                    "pool of other shapes (python -m s4mc.toy_pretrain)", path)
        pretrain_encoder()
        log.warning("pretrained encoder written to %s in %.0f s", path, time.perf_counter() - started)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m s4mc.toy_pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=str(DEFAULT_DIR), help="folder for the pool and encoder.pth "
                        "(default: %(default)s, where net.encoder.pretrained: toy looks)")
    parser.add_argument("--force", action="store_true", help="rebuild even if encoder.pth exists")
    # Off-recipe sizes, for a quick check that the command runs (tests/test_tools_smoke.py).
    parser.add_argument("--pool-images", type=int, default=RECIPE["pool_images"],
                        help="pool size (default: the recipe's %(default)s)")
    parser.add_argument("--epochs", type=int, default=RECIPE["epochs"], help="(default: the recipe's %(default)s)")
    parser.add_argument("--size", type=int, default=128, help="pool image side in px (default: %(default)s)")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra overrides of the toy config, e.g. net.encoder.kwargs.width=8")
    args = parser.parse_args(argv)
    off_recipe = (args.pool_images, args.epochs, args.size, args.opts) != (RECIPE["pool_images"], RECIPE["epochs"], 128, [])
    if off_recipe and Path(args.out_dir).resolve() == DEFAULT_DIR.resolve():
        # every run with net.encoder.pretrained: toy would load it without a word
        parser.error(f"--pool-images/--epochs/--size/--opts build an off-recipe encoder: give --out-dir other than {DEFAULT_DIR}")
    path = encoder_path(args.out_dir)
    if path.is_file() and not args.force:
        print(f"{path} exists (pass --force to rebuild)")
        return 0
    started = time.perf_counter()
    out = pretrain_encoder(args.out_dir, pool_images=args.pool_images, epochs=args.epochs, size=args.size,
                           extra=args.opts)
    info = json.loads((Path(args.out_dir) / "encoder.json").read_text())
    print(f"wrote {out} in {time.perf_counter() - started:.0f} s (pool validation mIoU "
          f"{100 * (info['pool_val_miou'] or 0):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
