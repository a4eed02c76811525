"""Training checkpoints in the U2PL/S4MC layout, written atomically, with RNG states for exact resume.

latest.pth holds `model_state` (student), `teacher_state`, `optimizer_state`, `epoch` and
`best_miou` like the release's, plus what an exact resume needs: `iteration`,
`semi_start`, `scaler_state`, `term_states` (each loss term's state by name) and one RNG snapshot per rank, `evaluated_weights`
(which of the two models the run's evaluation used, eval.py's default), the resolved `config`,
the logged `history` and, with several processes, each rank's own BN statistics (`rank_buffers`:
the model states hold their mean over ranks, the model that was evaluated). Older files kept the
contrastive memory bank under `memory_state`; resuming one restores it into the contrastive term.

Each save of latest.pth keeps the one before as latest.prev.pth, so a damaged latest.pth is not
the end of a run: `--resume auto` takes the newest of the two that loads. best.pth holds only
what evaluation needs (`best_checkpoint`): the evaluated weights under their key, the config and
the marks (epoch, iteration, best_miou); about a third of latest.pth.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from s4mc.distributed import all_gather_object, rank_averaged_buffers
from s4mc.engine.state import TrainState
from s4mc.errors import CheckpointError
from s4mc.models.weights import check_state_dict, load_tensor_file

FORMAT_VERSION = 1
LATEST, PREVIOUS, BEST = "latest.pth", "latest.prev.pth", "best.pth"
DAMAGED_SUFFIX = ".damaged"  # an unreadable latest.pth is kept aside under this suffix


class NotResumable(CheckpointError):
    """A checkpoint that holds no training state (best.pth); the message names what works instead."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a permission); the previous one is intact.

    `remedy` is what to do about it, for the loop to put after what it kept."""

    def __init__(self, message: str, remedy: str):
        super().__init__(message)
        self.remedy = remedy


def rng_snapshot(state: TrainState) -> dict:
    snap = {
        "torch": torch.get_rng_state(),
        # Plain lists, so the file loads with weights_only=True.
        "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
        "python": random.getstate(),
        "mixing": state.generator.get_state(),
    }
    if state.device.type == "cuda":
        snap["cuda"] = torch.cuda.get_rng_state(state.device)
    return snap


def restore_rng(state: TrainState, snap: dict) -> None:
    torch.set_rng_state(snap["torch"])
    name, keys, pos, has_gauss, cached = snap["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = snap["python"]
    random.setstate((version, tuple(internal), gauss))
    state.generator.set_state(snap["mixing"])
    if state.device.type == "cuda" and "cuda" in snap:
        torch.cuda.set_rng_state(snap["cuda"], state.device)


def _buffer_names(module: torch.nn.Module) -> set[str]:
    return {name for name, b in module.named_buffers() if b.is_floating_point()}


def make_checkpoint(state: TrainState, *, epoch: int, epoch_done: bool, config: dict | None = None) -> dict:
    """Collect the checkpoint dict. Collective: every rank must call it (RNG and BN gather)."""
    rngs = all_gather_object(rng_snapshot(state))
    student, teacher = state.student_module, state.teacher
    rank_buffers = None
    if state.dist.distributed:
        rank_buffers = all_gather_object({
            what: {k: v.detach().cpu().clone() for k, v in m.state_dict().items() if k in _buffer_names(m)}
            for what, m in (("student", student), ("teacher", teacher))})
    with rank_averaged_buffers(student, teacher):
        # Clone the buffers: the averaged values are put back to each rank's own on leaving.
        model_state = {k: v.clone() if k in _buffer_names(student) else v for k, v in student.state_dict().items()}
        teacher_state = {k: v.clone() if k in _buffer_names(teacher) else v for k, v in teacher.state_dict().items()}
    return {
        "format_version": FORMAT_VERSION,
        "model_state": model_state,
        "teacher_state": teacher_state,
        # What evaluate_model evaluates: the student until the semi-supervised phase begins
        # (warm-up, supervised-only runs), the teacher after. eval.py defaults to it.
        "evaluated_weights": "teacher" if state.semi_start is not None else "student",
        "optimizer_state": state.optimizer.state_dict(),
        "scaler_state": state.scaler.state_dict() if state.scaler is not None else None,
        "term_states": {name: term.state_dict() for name, term in state.terms.items()},
        # `epoch` is the next epoch to run when the epoch is done, as U2PL's resume expects.
        "epoch": epoch + 1 if epoch_done else epoch,
        "iteration": state.iteration,
        "semi_start": state.semi_start,
        "best_miou": state.best_miou,
        "rng_states": rngs,
        "rank_buffers": rank_buffers,
        "history": list(state.history),
        "config": config,
        "world_size": state.dist.world_size,
    }


def best_checkpoint(payload: dict) -> dict:
    """best.pth from a full checkpoint: the evaluated weights (under `teacher_state` or
    `model_state`, as U2PL names them), the config and the marks; nothing a resume needs.
    eval.py and `saver.pretrain` read it like any checkpoint."""
    key = "teacher_state" if payload["evaluated_weights"] == "teacher" else "model_state"
    kept = ("format_version", "evaluated_weights", "epoch", "iteration", "semi_start", "best_miou", "config",
            "world_size")
    return {"kind": "best", key: payload[key], **{k: payload[k] for k in kept if k in payload}}


def nonfinite_tensors(state: TrainState) -> list[str]:
    """Names of the student's and teacher's parameters and buffers that hold NaN or inf."""
    bad = []
    for what, module in (("student", state.student_module), ("teacher", state.teacher)):
        for name, t in module.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(f"{what} {name}")
    return bad


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete half-written checkpoints that a killed save left behind (see save_atomic)."""
    stale = sorted(folder.glob(".*.pth.tmp*")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


# Keys that do not change what a run computes: where it writes, how often it logs, saves and
# evaluates, the loader's worker count, where it stops (max_iters extends or shortens a run).
# Every other key must match the checkpoint's on resume.
NOT_RUN_SHAPING = ("output_dir", "config_file", "trainer.log_every", "trainer.image_every", "trainer.save_every",
                   "trainer.eval_every", "trainer.eval_on", "trainer.max_iters", "dataset.workers",
                   "saver.auto_resume", "evaluation")


def _flatten(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """`key: checkpoint value -> this run's value` for every run-shaping key that differs."""
    a, b = _flatten(saved), _flatten(current)
    rows = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or key.startswith(k + ".") for k in NOT_RUN_SHAPING):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            rows.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return rows


def previous_of(path: Path) -> Path:
    """latest.pth -> latest.prev.pth: where the checkpoint before it is kept."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def tensor_bytes(obj) -> int:
    """The bytes of every tensor in a nested checkpoint dict: about the size of its file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind an exception: torch's writer reports a failed write as a RuntimeError
    ("unexpected pos ...") raised while handling the file's own OSError."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def save_atomic(obj: dict, path: str | os.PathLike, keep_previous: bool = False) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file.

    keep_previous: the file being replaced becomes latest.prev.pth (see previous_of) by a rename
    as atomic as the write's. The older previous file goes before the write, so the disk holds at
    most two of them at any time, as without it. A write that fails (a full disk) removes its
    temporary file and raises CheckpointWriteError; `path` and its previous file are untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    previous = previous_of(path)
    if keep_previous and path.is_file():
        previous.unlink(missing_ok=True)  # `path` becomes the previous one below
    try:
        # A file object, not a path: torch's writer then fails with the OSError behind it.
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it the checkpoint
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        error = _os_error(exc)
        need = tensor_bytes(obj)
        free = shutil.disk_usage(path.parent).free
        full = error is not None and error.errno in (errno.ENOSPC, errno.EDQUOT)
        if full or (error is None and isinstance(exc, RuntimeError) and free < need):
            short = max(1, math.ceil((need - free) / 1e6))
            raise CheckpointWriteError(
                f"no space left on device at {path.parent}: writing {path.name} needs about "
                f"{math.ceil(need / 1e6)} MB and {free / 1e6:.0f} MB are free (the partial file is removed)",
                f"Free at least {short} MB there and continue with --resume auto.") from None
        if error is not None:
            raise CheckpointWriteError(f"cannot write {path}: {error.strerror or error}",
                                       "Fix that and continue with --resume auto.") from None
        raise
    if keep_previous and path.is_file():
        os.replace(path, previous)
    os.replace(tmp, path)


def resume_hint(path: Path) -> str:
    """A resume that works, for an error about the checkpoint at `path`."""
    if path.name in (LATEST, PREVIOUS):
        return (f"--resume auto takes the newest of {LATEST} and {PREVIOUS} in {path.parent} that loads; "
                f"--overwrite starts the run over")
    return "--resume auto continues the run from its own latest.pth"


def load_training_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"resume checkpoint not found: {path}")
    ckpt = load_tensor_file(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a training checkpoint: it holds a {type(ckpt).__name__}, not a dict")
    if ckpt.get("kind") == "best":
        raise NotResumable(
            f"{path} is a best.pth: it holds the evaluated weights ({ckpt.get('evaluated_weights')}) and the "
            f"config, not the optimizer state and both models an exact resume needs. Continue the run with "
            f"--resume auto (its latest.pth), or start a new run from these weights with --name NEW "
            f"--opts saver.pretrain={path}")
    missing = [k for k in ("model_state", "teacher_state", "optimizer_state", "epoch") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint: it lacks {missing}")
    return ckpt


def restore(state: TrainState, ckpt: dict, path: str) -> None:
    """Load a training checkpoint into `state` (every rank), strictly."""
    def strip(sd):
        return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}

    for module, key, what in ((state.student_module, "model_state", "student"), (state.teacher, "teacher_state", "teacher")):
        sd = strip(ckpt[key])
        check_state_dict(module, sd, path, what)
        module.load_state_dict(sd, strict=True)
    try:
        state.optimizer.load_state_dict(ckpt["optimizer_state"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: optimizer state does not fit this model/optimizer: {exc}") from exc
    if state.scaler is not None and ckpt.get("scaler_state"):
        state.scaler.load_state_dict(ckpt["scaler_state"])
    saved_terms = ckpt.get("term_states")
    if saved_terms is None and ckpt.get("memory_state") is not None:
        # Checkpoints written before loss terms became plug-ins kept U2PL's memory bank, the only
        # term state there was, under its own key; it is the contrastive term's state.
        saved_terms = {"contrastive": ckpt["memory_state"]}
    saved_terms = saved_terms or {}
    for name, term in state.terms.items():
        if name in saved_terms:
            term.load_state_dict(saved_terms[name])
    state.epoch = int(ckpt["epoch"])
    state.iteration = int(ckpt.get("iteration", state.epoch * state.iters_per_epoch))
    if state.iteration < state.epoch * state.iters_per_epoch:
        # An epoch marked done that was not: best.pth written at a mid-epoch stop (max_iters, a
        # signal) before this was fixed. Its iteration says where the epoch really stands.
        state.epoch = state.iteration // state.iters_per_epoch
    state.semi_start = ckpt.get("semi_start")
    state.best_miou = float(ckpt.get("best_miou", 0.0))
    rngs = ckpt.get("rng_states")
    state.history = list(ckpt.get("history") or [])
    own = ckpt.get("rank_buffers")
    if own and len(own) == state.dist.world_size:
        # Each rank continues from its own BN statistics, as if it had never stopped.
        with torch.no_grad():
            for module, what in ((state.student_module, "student"), (state.teacher, "teacher")):
                buffers = dict(module.named_buffers())
                for name, value in own[state.dist.rank][what].items():
                    buffers[name].copy_(value)
    if rngs and len(rngs) == state.dist.world_size:
        restore_rng(state, rngs[state.dist.rank])
    elif rngs:

        logging.getLogger("s4mc").warning(
            "checkpoint %s was written by %d ranks, this run has %d: RNG streams restart from the seed",
            path, len(rngs), state.dist.world_size,
        )
