"""Command lines of `train_semi.py` and `eval.py`; both scripts only call into here.

The package's modules are imported inside the functions that use them, so that `--help` and
argument errors answer at once, without loading torch.
"""

from __future__ import annotations

import argparse
import copy
import errno
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from s4mc.errors import CheckpointError, ConfigError, S4MCError, clean_message

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
  python eval.py --checkpoint runs/run1/checkpoints/best.pth     # the run's own config and protocol
  python eval.py --config experiments/pascal/366/config.yaml --checkpoint runs/run1/checkpoints/best.pth
  python eval.py --config C --checkpoint u2pl_ckpt.pth --weights teacher --mode center_crop
  torchrun --nproc_per_node=4 eval.py --config C --checkpoint P --mode sliding --save-dir preds --overlay
  python eval.py --config C --checkpoint P --images my_photos/ --save-dir preds --overlay
"""


def _common(parser: argparse.ArgumentParser, config_help: str | None = None) -> None:
    if config_help is None:
        parser.add_argument("--config", required=True, help="YAML config of the run (see experiments/)")
    else:
        parser.add_argument("--config", default=None, help=config_help)
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
        from s4mc.models import check_pretrained_file

        overrides = list(args.opts)
        if args.seed is not None:
            overrides.append(f"seed={args.seed}")
        cfg = load_config(args.config, overrides)
        name = args.name or default_run_name(args.config, cfg["seed"])
        prepare_toy_encoder(cfg)
        check_pretrained_file(cfg["net"])
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


# torchrun's and srun's variables: the toy encoder's own training run must not join the job's group.
_LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                       "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_NTASKS",
                       "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS")


def prepare_toy_encoder(cfg: dict, wait_s: float = 3600.0) -> None:
    """`net.encoder.pretrained: toy` builds its file on first use, before training starts.

    Building it is a training run of its own (s4mc/toy_pretrain.py), so it happens here and
    never inside `train`. One process builds it in-process; under torchrun or srun, rank 0
    builds it in a separate process (outside the job's process group) while the others wait.
    """
    from s4mc.distributed import launcher_ranks  # imported here: see the module docstring
    from s4mc.models.weights import TOY_ENCODER_FILE, TOY_ENCODER_NAME

    if cfg["net"]["encoder"]["pretrained"] != TOY_ENCODER_NAME or TOY_ENCODER_FILE.is_file():
        return
    rank, world = launcher_ranks()
    if world == 1:
        from s4mc.toy_pretrain import ensure_pretrained_encoder

        ensure_pretrained_encoder(cfg)
    elif rank == 0:
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
        print(f"rank 0: building the toy encoder {TOY_ENCODER_FILE} (python -m s4mc.toy_pretrain)", file=sys.stderr)
        if subprocess.run([sys.executable, "-m", "s4mc.toy_pretrain"], env=env).returncode != 0:
            raise S4MCError("building the toy encoder failed; run `python -m s4mc.toy_pretrain` alone to see why")
    else:
        deadline = time.monotonic() + wait_s
        while not TOY_ENCODER_FILE.is_file():
            if time.monotonic() > deadline:
                raise S4MCError(f"rank {rank}: waited {wait_s:.0f} s for rank 0 to build {TOY_ENCODER_FILE}")
            time.sleep(1.0)


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
    _common(parser, config_help="YAML config (see experiments/); default: the config the checkpoint was trained "
            "with, which this project's checkpoints carry (a U2PL/S4MC release checkpoint needs --config)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (.pth)")
    parser.add_argument("--weights", choices=("auto", "teacher", "student"), default="auto",
                        help="which weights of a training checkpoint to evaluate; auto (default): the ones the "
                        "run's own evaluation used (the student in warm-up and supervised-only runs), else teacher")
    parser.add_argument("--mode", choices=("whole", "center_crop", "sliding"), default=None,
                        help="whole image, U2PL's centre crop, or sliding window (Cityscapes). Default: the "
                        "protocol(s) training ran, the one that selects best.pth first (centre crop where "
                        "dataset.val.crop.type is center, as in the VOC configs, with evaluation.mode beside it)")
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
    device), the neighbour prior, the weights' name and the checkpoint's record: what evaluation
    and folder prediction both start from.

    Without --config the config is the one the checkpoint carries. The model is built without
    ImageNet weights (net.encoder.pretrained): the checkpoint holds every weight, and a run
    must evaluate where that file is absent.
    """
    from s4mc.config import config_from_checkpoint, load_config
    from s4mc.data import dataset_info
    from s4mc.distributed import init_distributed
    from s4mc.logs import setup_logging
    from s4mc.models import build_model, load_checkpoint
    from s4mc.data.priors import resolve_prior
    from s4mc.models.weights import read_checkpoint

    ckpt = read_checkpoint(args.checkpoint)
    saved = ckpt.get("config")
    if args.config is None:
        if not isinstance(saved, dict):
            raise ConfigError(f"{args.checkpoint} carries no config (it was not written by this project's "
                              f"train_semi.py, or by an older version of it); give the config with --config")
        cfg = config_from_checkpoint(saved, overrides, source=str(args.checkpoint))
    else:
        cfg = load_config(args.config, overrides)
    dist = init_distributed(args.local_rank, args.device)
    log = setup_logging(dist.rank)
    if args.config is None:
        log.info("config: the one %s was trained with (%s)", args.checkpoint, cfg["config_file"] or "no file name")
    info = dataset_info(cfg)
    net = copy.deepcopy(cfg["net"])
    net["encoder"]["pretrained"] = None
    model = build_model(net)
    try:
        loaded = load_checkpoint(model, args.checkpoint, which=args.weights, checkpoint=ckpt)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}{_trained_with(saved, cfg, args)}") from exc
    weights = loaded["which"]
    model.to(dist.device).eval()
    unsup = cfg["trainer"]["unsupervised"]
    prior = resolve_prior(unsup["neighbor_prior"], cfg["net"]["num_classes"], cfg["dataset"]["type"])
    record = {"best_miou": loaded["best_miou"], "config": saved if isinstance(saved, dict) else None}
    return cfg, dist, log, info, model, prior, weights, record


# net keys that do not change which tensors a model holds or their shapes.
_NOT_SHAPING_WEIGHTS = ("net.encoder.pretrained", "net.sync_bn", "net.ema_decay")


def _trained_with(saved, cfg: dict, args) -> str:
    """For a key mismatch: which config the checkpoint was trained with and how its model differs."""
    from s4mc.config import differences

    if not isinstance(saved, dict):
        return ""
    rows = differences(saved, cfg, prefix="net.", skip=_NOT_SHAPING_WEIGHTS)
    origin = saved.get("config_file") or "a config without a file name"
    text = f"\nThe checkpoint was trained with {origin}"
    if args.config is None:
        return text + "."
    if not rows:
        return text + f"; its net block equals that of {args.config}."
    return (text + f"; its model differs from that of {args.config} in:\n  " + "\n  ".join(rows)
            + "\nLeave out --config to evaluate with the checkpoint's own config.")


def run_eval(args, overrides: list[str]):
    """Build the model and validation data from the config, load the checkpoint, evaluate.

    Without --mode, the protocols training ran (`training_protocols`): the number that
    selected best.pth comes first and is named, any other beside it.
    """
    import torch

    from s4mc.data import build_val_dataset, build_val_loader
    from s4mc.evaluation import evaluate_configured, format_table, protocol_name, save_prediction, training_protocols
    from s4mc.predict import LEGEND_NAME, draw_legend
    from s4mc.runtime import resolve_amp

    cfg, dist, log, info, model, prior, weights, record = load_for_eval(args, overrides)
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
        if dist.is_main:
            draw_legend(out_dir / LEGEND_NAME, info.class_names, info.palette)

    # The run's selecting protocol is the training config's, also when --config is another file.
    run_cfg = record["config"] or cfg
    selecting = training_protocols(run_cfg)[0] if run_cfg["trainer"]["eval_on"] else None
    modes = [cfg["evaluation"]["mode"]] if args.mode is not None else training_protocols(cfg)
    log.info("evaluating %s (%s weights) on %d images: %s", args.checkpoint, weights, len(dataset),
             ", ".join(protocol_name(cfg, m) for m in modes))
    results = {}
    for i, mode in enumerate(modes):
        results[mode] = evaluate_configured(model, loader, cfg, device=dist.device, prior=prior,
                                            save_fn=save_fn if i == 0 else None, mode=mode,
                                            amp_dtype=resolve_amp(cfg["trainer"]["amp"], dist.device),
                                            distributed=dist.distributed)
    (first, result), *also = results.items()
    if dist.is_main:
        print(format_table(result, info.class_names))  # with a refined column under --refine
        print(eval_summary(cfg, results, selecting, record["best_miou"]))
        payload = {"config": cfg["config_file"], "checkpoint": str(args.checkpoint), "weights": weights,
                   "selects_best": selecting, "checkpoint_best_miou": record["best_miou"], **result.to_json(),
                   "also": {mode: r.to_json() for mode, r in also}}
        print(json.dumps({"miou": result.miou, "mode": first, "pixel_acc": result.pixel_acc,
                          "images_per_s": result.images_per_s,
                          "refined_miou": result.refined.miou if result.refined is not None else None,
                          **{f"miou_{mode}": r.miou for mode, r in also}}))
        if args.json:
            Path(args.json).write_text(json.dumps(payload, indent=2))
    return result


def eval_summary(cfg: dict, results: dict, selecting: str | None, best_miou: float | None) -> str:
    """One line: each protocol's mIoU by name, the one that selects best.pth marked, and the
    checkpoint's own record of it (best_miou) beside it."""
    from s4mc.evaluation import protocol_name

    parts = []
    for mode, r in results.items():
        text = f"{protocol_name(cfg, mode)} {100 * r.miou:.2f}"
        if mode == selecting:
            text += " (the protocol that selects best.pth"
            # best_miou: best.pth's own score; in latest.pth the run's best so far, of other weights.
            text += f"; the checkpoint records best mIoU {100 * best_miou:.2f})" if best_miou is not None else ")"
        parts.append(text)
    return "mIoU: " + "; ".join(parts)


def run_predict(args, overrides: list[str]):
    """eval.py --images: predictions for a folder of unlabeled images (s4mc.predict)."""
    from s4mc.runtime import resolve_amp
    from s4mc.evaluation import configured_inference
    from s4mc.predict import predict_folder

    cfg, dist, log, info, model, prior, weights, _ = load_for_eval(args, overrides)
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
