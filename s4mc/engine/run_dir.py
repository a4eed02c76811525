"""A run's folder: where its checkpoints go, which checkpoint it continues from, and the
refusals that keep one run from overwriting another."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple

from s4mc.engine import checkpoint as ckpt_io
from s4mc.errors import CheckpointError, S4MCError


def checkpoint_dir(run_dir: Path, cfg: dict) -> Path:
    """`saver.checkpoint_dir`, relative to the run directory unless absolute."""
    return run_dir / os.path.expanduser(cfg["saver"]["checkpoint_dir"])


class ResumePoint(NamedTuple):
    path: Path
    checkpoint: dict
    skipped: list  # [(path, why)]: newer checkpoints of the run that could not be used


def last_logged_iteration(run_dir: Path) -> int | None:
    """The last iteration metrics.jsonl recorded: how far the run had come before its last checkpoint."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        return max(int(json.loads(line)["iteration"]) for line in lines if line.strip())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _no_checkpoint_to_continue(run_dir: Path, ckpt_dir: Path, why: str) -> CheckpointError:
    """The refusal when a run's folder holds nothing to resume from; it names what works."""
    best = ckpt_dir / ckpt_io.BEST
    start_from_best = (f", or start a new run from {best.name}'s weights: --name NEW --opts saver.pretrain={best}"
                       if best.is_file() else "")
    return CheckpointError(f"--resume auto: {why}. Start the run over with --overwrite (it deletes the "
                           f"checkpoints), give it another --name{start_from_best}.")


def find_resume(resume: str | None, run_dir: Path, cfg: dict) -> ResumePoint | None:
    """The checkpoint a run continues from, loaded.

    `auto`: the newest of latest.pth and latest.prev.pth that loads (a warning in the run's log
    names the one used and the iterations done again); none of them: a fresh start, unless the
    folder holds other checkpoints (best.pth), which a fresh start would replace.
    """
    if resume is None and cfg["saver"]["auto_resume"]:
        resume = "auto"
    if resume is None:
        return None
    ckpt_dir = checkpoint_dir(run_dir, cfg)
    if resume == "auto":
        latest = ckpt_dir / ckpt_io.LATEST
        candidates = [latest, ckpt_io.previous_of(latest)]
        skipped = []
        for path in candidates:
            if not path.is_file():
                if path == latest and candidates[1].is_file():
                    skipped.append((path, "it is missing"))
                continue
            try:
                return ResumePoint(path, ckpt_io.load_training_checkpoint(path), skipped)
            except CheckpointError as exc:
                skipped.append((path, str(exc).replace(str(path), path.name)))
        if skipped:
            raise _no_checkpoint_to_continue(run_dir, ckpt_dir, "no checkpoint of the run loads: " + "; ".join(
                f"{path.name}: {why}" for path, why in skipped))
        others = sorted(p.name for p in ckpt_dir.glob("*.pth")) if ckpt_dir.is_dir() else []
        if others:
            raise _no_checkpoint_to_continue(
                run_dir, ckpt_dir, f"{ckpt_dir} holds no {ckpt_io.LATEST} or {ckpt_io.PREVIOUS} to continue "
                f"from, only {', '.join(others)}")
        return None
    path = Path(resume).expanduser()
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no such checkpoint file; {ckpt_io.resume_hint(path)}")
    try:
        return ResumePoint(path, ckpt_io.load_training_checkpoint(path), [])
    except ckpt_io.NotResumable:
        raise  # best.pth: its message names the ways on
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}. {ckpt_io.resume_hint(path)}") from exc


def refuse_to_overwrite(run_dir: Path, existing: list[str]) -> S4MCError:
    if ckpt_io.LATEST in existing or ckpt_io.PREVIOUS in existing:
        return S4MCError(
            f"{run_dir} already holds a run ({', '.join(existing)}). Continue it with --resume auto, "
            f"start it over with --overwrite, or give this run another --name."
        )
    return S4MCError(
        f"{run_dir} already holds a run's {', '.join(existing)} but no {ckpt_io.LATEST} to continue from. "
        f"Start it over with --overwrite (it deletes them), or give this run another --name."
    )


def clear_outputs(run_dir: Path, ckpt_dir: Path) -> None:
    """--overwrite: remove the earlier run's outputs, so nothing of it is mistaken for this run's."""
    for path in sorted([*ckpt_dir.glob("*.pth"), *ckpt_dir.glob("*.pth" + ckpt_io.DAMAGED_SUFFIX)]):
        path.unlink()
    for name in ("results.json", "train.log", "metrics.jsonl"):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
