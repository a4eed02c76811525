"""Command lines of `train_semi.py` and `eval.py`; both scripts only call into here."""

from __future__ import annotations

import argparse
import errno
import json
import re
import sys
from pathlib import Path

from s4mc.errors import S4MCError

TRAIN_EPILOG = """
examples:
  python train_semi.py --config experiments/toy/config.yaml
  torchrun --nproc_per_node=8 train_semi.py --config experiments/pascal/366/config.yaml --seed 0 --name run1
  python train_semi.py --config C --resume auto --opts trainer.epochs=10 dataset.batch_size=2

A run writes runs/<name>/: config.yaml (resolved), environment.json (git commit, versions, and the
run protocol that the log's header states), train.log, tensorboard/ events, checkpoints/latest.pth and
best.pth, results.json.
"""

EVAL_EPILOG = """
examples:
  python eval.py --config experiments/pascal/366/config.yaml --checkpoint runs/run1/checkpoints/best.pth
  python eval.py --config C --checkpoint u2pl_ckpt.pth --weights teacher --mode center_crop
  torchrun --nproc_per_node=4 eval.py --config C --checkpoint P --mode sliding --save-dir preds --overlay
  python eval.py --config C --checkpoint P --images my_photos/ --save-dir preds --overlay
"""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config of the run (see experiments/)")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. trainer.epochs=10 dataset.batch_size=2")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when available (default)")
    # torch.distributed.launch (legacy) passes one of these; torchrun sets LOCAL_RANK instead.
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)


def default_run_name(config_path: str, seed: int) -> str:
    """experiments/pascal/366/config.yaml with seed 0 -> pascal_366_seed0 (stable, so --resume auto finds it)."""
    path = Path(config_path).resolve()
    parts = path.parent.parts
    if "experiments" in parts:
        parts = parts[parts.index("experiments") + 1:]
    else:
        parts = parts[-1:]
    stem = "_".join(parts) if path.stem == "config" else "_".join([*parts, path.stem])
    return f"{stem or path.stem}_seed{seed}"


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="train_semi.py",
        description="Train S4MC (or the CutMix-Seg / supervised baselines) from one YAML config. "
        "Works as a single process, under torchrun, or under the legacy torch.distributed.launch.",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(parser)
    parser.add_argument("--seed", type=int, default=None, help="run seed (default: the config's `seed`, 0)")
    parser.add_argument("--name", default=None, help="run name, the folder under output_dir "
                        "(default: derived from the config path and seed)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="auto: continue from <run>/checkpoints/latest.pth if it exists; or a checkpoint path")
    parser.add_argument("--overwrite", action="store_true",
                        help="start the run over even though its folder holds checkpoints (they are deleted)")
    parser.add_argument("--debug-dump", action="store_true", help=argparse.SUPPRESS)  # tests: see loop.train
    args = parser.parse_args(argv)

    try:
        # Inside the try: a Ctrl-C during these imports (torch takes seconds) ends in one line too.
        # The except clauses below name only what is bound before them for that reason.
        from s4mc.config import load_config
        from s4mc.engine.interrupt import SecondInterrupt, TrainingInterrupted
        from s4mc.engine.loop import TrainingDiverged, train

        overrides = list(args.opts)
        if args.seed is not None:
            overrides.append(f"seed={args.seed}")
        cfg = load_config(args.config, overrides)
        name = args.name or default_run_name(args.config, cfg["seed"])
        train(cfg, name=name, resume=args.resume, device=args.device, local_rank=args.local_rank,
              argv=[sys.argv[0], *(argv if argv is not None else sys.argv[1:])], overwrite=args.overwrite,
              debug_dump=args.debug_dump)
    except KeyboardInterrupt as exc:
        second = "s4mc.engine.interrupt" in sys.modules and isinstance(exc, SecondInterrupt)
        print("aborted by a second Ctrl-C; nothing was saved after the last checkpoint" if second
              else INTERRUPTED_OUTSIDE_THE_LOOP, file=sys.stderr)
        return 130
    except S4MCError as exc:  # raised only once the imports above are done
        if isinstance(exc, TrainingInterrupted):
            print(exc, file=sys.stderr)
            return 128 + int(exc.signum)
        _report(exc)
        return 3 if isinstance(exc, TrainingDiverged) else 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # A full disk outside the checkpoint writer (the log, metrics.jsonl): still one line.
        print(f"error: no space left on device{f' at {exc.filename}' if exc.filename else ''}; checkpoints "
              f"already written are intact: free some space and continue with --resume auto", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if not lost_a_peer(exc):
            raise
        _report_lost_peer(exc)
        return 1
    finally:
        _cleanup()
    return 0


INTERRUPTED_OUTSIDE_THE_LOOP = ("interrupted by Ctrl-C before the training loop began or after it ended; this "
                                "interruption saved nothing, checkpoints already written are kept")


def _cleanup() -> None:
    # Only once s4mc.distributed is imported: after a Ctrl-C during the imports, importing it
    # here would start importing torch again.
    distributed = sys.modules.get("s4mc.distributed")
    if distributed is not None:
        distributed.cleanup()


# What gloo and NCCL say when the process at the other end of a collective is gone.
PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Connection refused", "Broken pipe",
             "NCCL communicator was aborted", "Socket Timeout", "remote process exited")


def lost_a_peer(exc: BaseException) -> bool:
    """A collective failed because another process of the run is gone (killed, crashed)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return False
    # DDP's buffer broadcast raises a plain RuntimeError, so the text decides as well as the type.
    return isinstance(exc, getattr(dist, "DistNetworkError", ())) or any(p in str(exc) for p in PEER_GONE)


def _report_lost_peer(exc: BaseException) -> None:
    """One line per surviving rank instead of the collective's traceback."""
    import os

    rank = int(os.environ.get("RANK", "0"))
    text = str(exc).strip()
    # gloo's first sentence without its source location: "Read error [host]:port: Connection reset by peer"
    first = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0].split(". ")[0]) if text else type(exc).__name__
    print(f"error [rank {rank}]: another process of this run is gone (killed or crashed; the launcher's "
          f"report names it), so this one stops too ({first[:160]}); the last checkpoint is kept: continue "
          f"with --resume auto", file=sys.stderr)


def _report(exc: BaseException) -> None:
    """Print a fatal error once: rank 0 always, another rank only with an error of its own
    (every rank loads the same config, so a config error would print once per process)."""
    import os

    from s4mc.errors import ConfigError, clean_message

    rank = int(os.environ.get("RANK", "0"))
    text = clean_message(exc)
    if rank == 0:
        print(f"error: {text}", file=sys.stderr)
    elif not isinstance(exc, ConfigError):
        print(f"error [rank {rank}]: {text}", file=sys.stderr)


def eval_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="eval.py",
        description="Evaluate a checkpoint with the same function training uses. Loads this project's "
        "checkpoints and U2PL/S4MC ones (module. prefix, teacher_state/model_state).",
        epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(parser)
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (.pth)")
    parser.add_argument("--weights", choices=("auto", "teacher", "student"), default="auto",
                        help="which weights of a training checkpoint to evaluate; auto (default): the ones the "
                        "run's own evaluation used (the student in warm-up and supervised-only runs), else teacher")
    parser.add_argument("--mode", choices=("whole", "center_crop", "sliding"), default=None,
                        help="whole image (default), U2PL's centre crop, or sliding window (Cityscapes)")
    parser.add_argument("--scales", type=float, nargs="+", default=None, help="multi-scale inference, e.g. 0.75 1 1.25")
    parser.add_argument("--flip", action="store_true", default=None, help="add horizontally flipped inference")
    parser.add_argument("--refine", action="store_true", default=None,
                        help="also report S4MC test-time neighbour refinement (the release's refine_infer)")
    parser.add_argument("--save-dir", default=None, help="write a colour-palette PNG per image here")
    parser.add_argument("--overlay", action="store_true", help="with --save-dir, also write overlays on the image")
    parser.add_argument("--json", default=None, help="also write the result as JSON to this file")
    parser.add_argument("--workers", type=int, default=None, help="data loader workers (default: dataset.workers)")
    parser.add_argument("--images", default=None, metavar="DIR",
                        help="predict every image under DIR (nested folders; png/jpg/bmp/tif/webp) into --save-dir "
                        "instead of evaluating: one palette PNG per image at its size, and legend.png; no labels "
                        "needed; nothing is written next to the inputs. Files that do not decode are named, skipped "
                        "and counted in the closing summary. With --refine the refined prediction is written")
    args = parser.parse_args(argv)
    if args.images is not None and not args.save_dir:
        parser.error("--images needs --save-dir (where the predictions go)")

    overrides = list(args.opts)
    for key, value in (("evaluation.mode", args.mode), ("evaluation.flip", args.flip),
                       ("evaluation.refine", args.refine)):
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    if args.scales is not None:
        overrides.append(f"evaluation.scales={json.dumps(args.scales)}")
    try:
        result = run_predict(args, overrides) if args.images is not None else run_eval(args, overrides)
    except S4MCError as exc:
        _report(exc)
        return 2
    except KeyboardInterrupt:
        print("interrupted by Ctrl-C; what was written before it is kept", file=sys.stderr)
        return 130
    finally:
        _cleanup()
    return 0 if result is not None else 1


def load_for_eval(args, overrides: list[str]):
    """Config, process group, logger, dataset info, the checkpoint's model (eval mode, on the
    device) and the neighbour prior: what evaluation and folder prediction both start from."""
    from s4mc.config import load_config
    from s4mc.data import dataset_info
    from s4mc.distributed import init_distributed
    from s4mc.logs import setup_logging
    from s4mc.models import build_model, load_checkpoint
    from s4mc.priors_table import resolve_prior

    cfg = load_config(args.config, overrides)
    dist = init_distributed(args.local_rank, args.device)
    log = setup_logging(dist.rank)
    info = dataset_info(cfg)
    model = build_model(cfg["net"])
    loaded = load_checkpoint(model, args.checkpoint, which=args.weights)
    weights = loaded["which"]
    model.to(dist.device).eval()
    unsup = cfg["trainer"]["unsupervised"]
    prior = resolve_prior(unsup["neighbor_prior"], cfg["net"]["num_classes"], cfg["dataset"]["type"])
    return cfg, dist, log, info, model, prior, weights


def run_eval(args, overrides: list[str]):
    """Build the model and validation data from the config, load the checkpoint, evaluate."""
    import torch

    from s4mc.data import build_val_dataset
    from s4mc.runtime import resolve_amp
    from s4mc.evaluation import build_val_loader, evaluate_configured, format_table, save_prediction

    cfg, dist, log, info, model, prior, weights = load_for_eval(args, overrides)
    dataset = build_val_dataset(cfg)
    workers = cfg["dataset"]["workers"] if args.workers is None else args.workers
    loader = build_val_loader(dataset, rank=dist.rank, world_size=dist.world_size, workers=workers,
                              batch_size=cfg["evaluation"]["batch_size"])
    save_fn = None  # eval.py --save-dir replaces it with a writer of palette PNGs
    if args.save_dir:
        out_dir = Path(args.save_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        mean = torch.tensor(cfg["dataset"]["mean"]).view(3, 1, 1)
        std = torch.tensor(cfg["dataset"]["std"]).view(3, 1, 1)

        def write_png(image_id, pred, image):
            name = str(image_id).replace("/", "_").rsplit(".", 1)[0] + ".png"
            rgb = None
            if args.overlay and image is not None:
                rgb = (image.detach().float().cpu() * std + mean).clamp(0, 255).byte().permute(1, 2, 0).numpy()
            save_prediction(out_dir / name, pred, info.palette, image=rgb)

        save_fn = write_png

    log.info("evaluating %s (%s weights) on %d images, mode %s", args.checkpoint, weights, len(dataset),
             cfg["evaluation"]["mode"])
    result = evaluate_configured(model, loader, cfg, device=dist.device, prior=prior, save_fn=save_fn,
                                 amp_dtype=resolve_amp(cfg["trainer"]["amp"], dist.device),
                                 distributed=dist.distributed)
    if dist.is_main:
        print(format_table(result, info.class_names))  # with a refined column under --refine
        payload = {"config": cfg["config_file"], "checkpoint": str(args.checkpoint), "weights": weights,
                   **result.to_json()}
        print(json.dumps({"miou": result.miou, "pixel_acc": result.pixel_acc, "images_per_s": result.images_per_s,
                          "refined_miou": result.refined.miou if result.refined is not None else None}))
        if args.json:
            Path(args.json).write_text(json.dumps(payload, indent=2))
    return result


def run_predict(args, overrides: list[str]):
    """eval.py --images: predictions for a folder of unlabeled images (s4mc.predict)."""
    from s4mc.runtime import resolve_amp
    from s4mc.evaluation import configured_inference
    from s4mc.predict import predict_folder

    cfg, dist, log, info, model, prior, weights = load_for_eval(args, overrides)
    ev = cfg["evaluation"]
    if ev["mode"] == "center_crop":
        log.info("evaluation.mode center_crop: predicting whole images (the crop only serves U2PL's scoring)")
    log.info("predicting %s with %s (%s weights): %s, scales %s%s%s", args.images, args.checkpoint, weights,
             ev["mode"], ev["scales"], ", flip" if ev["flip"] else "", ", refined" if ev["refine"] else "")
    infer = configured_inference(model, cfg, device=dist.device, prior=prior,
                                 amp_dtype=resolve_amp(cfg["trainer"]["amp"], dist.device))
    summary = predict_folder(infer, args.images, args.save_dir, class_names=info.class_names,
                             palette=info.palette, mean=cfg["dataset"]["mean"], std=cfg["dataset"]["std"],
                             overlay=args.overlay, rank=dist.rank, world_size=dist.world_size,
                             workers=cfg["dataset"]["workers"] if args.workers is None else args.workers)
    if dist.is_main:
        print(summary.format(args.save_dir))
        if args.json:
            payload = {"config": cfg["config_file"], "checkpoint": str(args.checkpoint), "weights": weights,
                       "images": str(args.images), "save_dir": str(args.save_dir), **summary.to_json()}
            Path(args.json).write_text(json.dumps(payload, indent=2))
    return summary
