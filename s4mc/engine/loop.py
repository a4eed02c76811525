"""The training run: set-up, epochs, evaluation, checkpoints and resume."""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import torch

from s4mc import pseudo_label
from s4mc.distributed import DistInfo, all_reduce_mean, barrier, init_distributed, rank_averaged_buffers
from s4mc.engine import checkpoint as ckpt_io
from s4mc.data import build_train_loaders, build_val_dataset, build_val_loader, dataset_info
from s4mc.data.priors import resolve_prior
from s4mc.engine.batches import build_partner_loader, epoch_batches, loader_options
from s4mc.engine.interrupt import StopRequest, TrainingInterrupted, interrupted_message, worker_died
from s4mc.engine.optim import build_optimizer, resolve_accumulate
from s4mc.engine.run_dir import (ResumePoint, checkpoint_dir, clear_outputs, find_resume, last_logged_iteration,
                                 refuse_to_overwrite)
from s4mc.engine.run_header import announce_run_header, build_run_header, count_images
from s4mc.engine.state import TrainState
from s4mc.engine.step import train_step
from s4mc.errors import ConfigError, S4MCError, clean_message
from s4mc.evaluation import evaluate_configured, format_table, training_protocols
from s4mc.methods import METHODS, build_method
from s4mc.models import build_model, load_checkpoint, maybe_sync_bn
from s4mc.runtime import resolve_amp, seed_everything, write_run_info
from s4mc.terms import build_terms, needs_rep
from s4mc.logs import (MetricsLog, Progress, attach_log_file, comparison_line, detach_log_file, format_duration, log,
                       log_fatal_to_file, log_visuals, open_writer, setup_logging, study_row)

class TrainingDiverged(S4MCError):
    """The loss or the model became NaN or infinite; the last good checkpoint is left untouched."""


# --------------------------------------------------------------------------- set-up helpers
def set_rep_output(model: torch.nn.Module, enabled: bool) -> None:
    """Compute `rep` only when the contrastive term uses it.

    Its weights stay in the model (and in checkpoints, key for key with the release),
    but are frozen so DDP does not wait for gradients that never come.
    """
    decoder = model.decoder
    if getattr(decoder, "representation", None) is None:
        return
    decoder.rep_head = enabled
    decoder.representation.requires_grad_(enabled)


# --------------------------------------------------------------------------- the run
def build_state(cfg: dict, dist: DistInfo, iters_per_epoch: int) -> TrainState:
    """Student, teacher, optimizer and the rest, placed on the device."""
    tr = cfg["trainer"]
    student = build_model(cfg["net"])
    if cfg["saver"]["pretrain"]:
        load_checkpoint(student, cfg["saver"]["pretrain"], which="student")
        log.info("initialised the student from %s", cfg["saver"]["pretrain"])
    set_rep_output(student, needs_rep(cfg))
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)

    channels_last = tr["channels_last"] if tr["channels_last"] != "auto" else dist.device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    student = maybe_sync_bn(student, cfg["net"]["sync_bn"], dist.distributed, dist.device)
    teacher = maybe_sync_bn(teacher, cfg["net"]["sync_bn"], dist.distributed, dist.device)
    student.to(dist.device, memory_format=memory_format)
    teacher.to(dist.device, memory_format=memory_format)
    amp_dtype = resolve_amp(tr["amp"], dist.device)
    optimizer = build_optimizer(student, cfg, dist.world_size, grad_scaler=amp_dtype == torch.float16)
    wrapped = student
    if dist.distributed:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(student, device_ids=ids)
    student_forward = teacher_forward = indicator_maps = None
    if tr["compile"]:
        if dist.device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "cc")):
            raise ConfigError("trainer.compile: true on the CPU needs a C++ compiler (g++, c++ or cc) on PATH, "
                              "and none was found; install one or set trainer.compile: false")
        # Static shapes: training batches never change size (drop_last), and a dynamic-shape
        # graph would be slower. The wrappers share parameters with the plain modules.
        student_forward = torch.compile(wrapped, dynamic=False)
        teacher_forward = torch.compile(teacher, dynamic=False)
        # The S4MC loss's dense part (softmax, indicator, refinement): ~45 elementwise passes
        # over [B, C, H, W] in eager mode, a few fused kernels compiled. Still fp32 throughout.
        indicator_maps = torch.compile(pseudo_label.indicator_maps, dynamic=False)
        log.info("trainer.compile: the first step compiles student and teacher (about 3 min for R101 "
                 "on 16 cores; seconds once inductor's cache is warm)")
        if dist.distributed and cfg["net"]["sync_bn"]:
            log.warning("trainer.compile with SyncBatchNorm across processes has not been benchmarked "
                        "here; compare images/s with trainer.compile: false on your setup")
    scaler = torch.amp.GradScaler(dist.device.type) if amp_dtype == torch.float16 else None
    generator = torch.Generator().manual_seed(cfg["seed"] * 1000 + dist.rank)
    prior = resolve_prior(tr["unsupervised"]["neighbor_prior"], cfg["net"]["num_classes"], cfg["dataset"]["type"])
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = tr["cudnn_benchmark"] and not tr["deterministic"]
    return TrainState(
        student=wrapped, teacher=teacher, optimizer=optimizer, device=dist.device,
        max_iters=tr["epochs"] * iters_per_epoch, iters_per_epoch=iters_per_epoch, generator=generator,
        amp_dtype=amp_dtype, scaler=scaler, channels_last=channels_last,
        prior=prior.to(dist.device) if prior is not None else None, method=build_method(cfg),
        terms=build_terms(cfg, dist.device),
        dist=dist, student_forward=student_forward, teacher_forward=teacher_forward, indicator_maps=indicator_maps,
    )


def set_epoch(loader, epoch: int) -> None:
    # Shuffling and each item's augmentation are functions of (seed, epoch, index): see
    # s4mc.data.loaders.SeededDataset. That is what makes a mid-epoch resume exact.
    sampler = getattr(loader, "sampler", None) if loader is not None else None
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def evaluate_model(state: TrainState, cfg: dict, val_loader, semi: bool = True) -> dict:
    """Evaluate the teacher once the semi phase has begun, the student before (docs/method.md step 12).
    A method with `evaluates_student = True` (UniMatch V2) has the student evaluated too, as
    `student_<mode>` after the teacher's results.

    Returns {mode: result} for each of `training_protocols(cfg)`; the first selects best.pth.
    With several processes and no SyncBN, the model evaluated holds the ranks' mean BN
    statistics, the same model a checkpoint saves (see `rank_averaged_buffers`).
    """
    teacher = semi and state.semi_start is not None
    models = {"": state.teacher if teacher else state.student_module}
    if teacher and getattr(state.method, "evaluates_student", False):
        models["student_"] = state.student_module  # logged beside the teacher's, which selects best.pth
    with rank_averaged_buffers(state.student_module, state.teacher):
        return {prefix + mode: evaluate_configured(model, val_loader, cfg, device=state.device,
                                                   amp_dtype=state.amp_dtype, prior=state.prior,
                                                   distributed=state.dist.distributed, mode=mode)
                for prefix, model in models.items() for mode in training_protocols(cfg)}


@dataclass
class Run:
    """One training run, from its set-up to its end: what `train`'s parts share."""

    cfg: dict
    dist: DistInfo
    name: str
    run_dir: Path
    ckpt_dir: Path
    state: TrainState
    labeled_loader: Any
    unlabeled_loader: Any
    partner_loader: Any
    val_loader: Any
    info: Any  # s4mc.data.DatasetInfo: class names and palette for the logs
    accumulate: int  # micro-batches per optimizer step
    iters_per_epoch: int  # optimizer steps
    stop_at: int  # the last optimizer step (the schedule's, or trainer.max_iters)
    writer: Any = None  # TensorBoard, rank 0 only
    metrics_log: MetricsLog | None = None
    progress: Progress | None = None
    stop: StopRequest | None = None
    debug_dump: bool = False
    debug: dict = field(default_factory=dict)
    latest_iteration: int | None = None  # the iteration the last good latest checkpoint holds
    latest_name: str = ckpt_io.LATEST
    images_since_eval: bool = False
    stepping: bool = False  # inside a training step: the state is not whole
    results: dict | None = None  # the last evaluation, {protocol: result}, the selecting one first
    start_time: float = 0.0

    @property
    def total_iters(self) -> int:
        return self.cfg["trainer"]["epochs"] * self.iters_per_epoch

    @property
    def main_loader(self):
        return self.labeled_loader if self.cfg["trainer"]["mode"] == "sup" else self.unlabeled_loader

    def reduce_metrics(self, local: dict) -> dict:
        reduced = all_reduce_mean(local)
        self.state.history.append({k: float(v) for k, v in reduced.items()})
        if self.debug_dump:
            self.debug["local_metrics"] = {k: float(v) for k, v in local.items()}
            self.debug["reduced_metrics"] = {k: float(v) for k, v in reduced.items()}
        return reduced

    def kept_note(self) -> str:
        kept = self.ckpt_dir / self.latest_name
        if not kept.is_file():
            return "No checkpoint had been written yet."
        when = f" (iteration {self.latest_iteration})" if self.latest_iteration is not None else ""
        return f"The last good checkpoint, {kept}{when}, is kept."

    def save(self, filename: str, epoch: int, epoch_done: bool) -> None:
        """Write a checkpoint (rank 0), after every rank agrees the model is finite."""
        state = self.state
        check_finite(state, self.kept_note())
        bad = ckpt_io.nonfinite_tensors(state)
        if any_rank(bool(bad), state):
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "") if bad else "on another rank"
            raise TrainingDiverged(
                f"after iteration {state.iteration} the model holds non-finite values ({shown}) although the "
                f"loss was finite; stopping without writing {filename}. {self.kept_note()}"
            )
        payload = ckpt_io.make_checkpoint(state, epoch=epoch, epoch_done=epoch_done, config=self.cfg)
        failed = None
        if self.dist.is_main:
            try:
                ckpt_io.save_atomic(ckpt_io.best_checkpoint(payload) if filename == ckpt_io.BEST else payload,
                                    self.ckpt_dir / filename, keep_previous=filename == ckpt_io.LATEST)
            except ckpt_io.CheckpointWriteError as exc:
                failed = exc
        if any_rank(failed is not None, state):  # every rank stops, none waits in a collective
            if failed is None:
                raise ckpt_io.CheckpointWriteError(f"rank 0 could not write {filename} (its error says why)", "")
            raise ckpt_io.CheckpointWriteError(f"{failed}. {self.kept_note()} {failed.remedy}", failed.remedy)
        if filename == ckpt_io.LATEST:
            self.latest_iteration, self.latest_name = state.iteration, ckpt_io.LATEST

    def interrupted(self) -> TrainingInterrupted:
        return TrainingInterrupted(interrupted_message(
            f"stopped by {self.stop.name} after iteration {self.state.iteration}; {self.ckpt_dir / 'latest.pth'} "
            f"is saved. Continue with --resume auto."), self.stop.signum or signal.SIGINT)

    def stopped_by_worker_death(self) -> TrainingInterrupted:
        """A DataLoader worker died while a stop was pending (the signal reached it while it was
        starting, before it ignored it): still the requested stop, not a crash."""
        if not self.stepping and not self.dist.distributed:
            # Between steps: the state is whole, save it (unless this iteration is saved already).
            if self.latest_iteration != self.state.iteration:
                self.save("latest.pth", self.state.epoch, epoch_done=False)
            return self.interrupted()
        # Mid-step, or with several processes (the others are in a collective a save would not
        # match): nothing consistent to save here.
        return TrainingInterrupted(
            f"stopped by {self.stop.name} during iteration {self.state.iteration + 1}: a DataLoader worker was "
            f"killed before the step ended, so nothing was saved now. {self.kept_note()} Continue with --resume auto.",
            self.stop.signum or signal.SIGINT)


def train(cfg: dict, *, name: str, resume: str | None = None, device: str = "auto",
          local_rank: int | None = None, argv: list[str] | None = None, overwrite: bool = False,
          debug_dump: bool = False) -> dict:
    """Run training as configured; returns the final evaluation as a JSON-able dict.

    The run directory is only written once everything is built and a resume checkpoint has
    loaded, so a start that fails leaves no trace. Checkpoints of an earlier run are never
    replaced unless `resume` continues that run or `overwrite` is given. `debug_dump` (a test
    hook) makes every rank write its parameters and last local and reduced metrics to
    debug_rank<R>.pt in the run directory, so a test can check that DDP kept the ranks identical
    and that logged metrics are rank means.
    """
    run = start_run(cfg, name=name, resume=resume, device=device, local_rank=local_rank, argv=argv,
                    overwrite=overwrite, debug_dump=debug_dump)
    run.stop = StopRequest(run.dist.device, run.dist.distributed).install()
    run.start_time = time.perf_counter()
    try:
        for epoch in range(run.state.epoch, cfg["trainer"]["epochs"]):
            if run.state.iteration >= run.stop_at:
                break
            train_epoch(run, epoch)
            end_epoch(run, epoch)
    except TrainingInterrupted as exc:
        log_fatal_to_file(str(exc), prefix="")
        raise
    except RuntimeError as exc:
        if run.stop.signum is None or not worker_died(exc):
            log_fatal_to_file(clean_message(exc) if isinstance(exc, S4MCError) else traceback.format_exc())
            raise
        try:
            stopped = run.stopped_by_worker_death()
        except BaseException as inner:  # the save failed (a full disk, a non-finite model): that is the news
            log_fatal_to_file(clean_message(inner) if isinstance(inner, S4MCError) else traceback.format_exc())
            raise
        log_fatal_to_file(str(stopped), prefix="")
        raise stopped from None
    except BaseException as exc:  # the run's log says how it ended, once (only rank 0 has the file)
        log_fatal_to_file(clean_message(exc) if isinstance(exc, S4MCError) else traceback.format_exc())
        raise
    finally:
        run.stop.restore()
        if run.writer is not None:
            run.writer.flush()
    return finish_run(run)


def start_run(cfg: dict, *, name: str, resume: str | None, device: str, local_rank: int | None,
              argv: list[str] | None, overwrite: bool, debug_dump: bool) -> Run:
    """Everything before the first step: processes, data, model, the resumed state, the run's
    folder, its logs and its header."""
    dist = init_distributed(local_rank, device)
    tr = cfg["trainer"]
    run_dir = Path(cfg["output_dir"]) / name
    ckpt_dir = checkpoint_dir(run_dir, cfg)
    setup_logging(dist.rank)  # console; the run's train.log joins once the run has started
    resume_point = find_resume(resume, run_dir, cfg)
    resume_path = resume_point.path if resume_point is not None else None
    continuing = resume_path is not None and resume_path.resolve().parent == ckpt_dir.resolve()
    existing = sorted(p.name for p in ckpt_dir.glob("*.pth")) if ckpt_dir.is_dir() else []
    if existing and not continuing and not overwrite:
        raise refuse_to_overwrite(run_dir, existing)
    seed_everything(cfg["seed"], dist.rank, tr["deterministic"])

    sup_only = tr["mode"] == "sup"
    check_batch_norm_batch(cfg, dist)
    loaders = build_train_loaders(cfg, rank=dist.rank, world_size=dist.world_size, seed=cfg["seed"],
                                  labeled_only=sup_only, **loader_options(cfg))
    main_loader = loaders.labeled if sup_only else loaders.unlabeled
    accumulate = resolve_accumulate(cfg, dist.world_size)
    # An epoch is this many optimizer steps; a last group of fewer than `accumulate` batches is dropped.
    iters_per_epoch = len(main_loader) // accumulate
    if iters_per_epoch == 0:
        raise S4MCError(f"the training loader is empty: fewer batches ({len(main_loader)}) than trainer.accumulate "
                        f"({accumulate}), or fewer images than dataset.batch_size × GPUs")
    val_loader = None
    if tr["eval_on"]:
        val_loader = build_val_loader(build_val_dataset(cfg), rank=dist.rank, world_size=dist.world_size,
                                      workers=cfg["dataset"]["workers"], batch_size=cfg["evaluation"]["batch_size"])
    state = build_state(cfg, dist, iters_per_epoch)
    if resume_point is not None:
        restore_from(state, resume_point, cfg)

    total_iters = tr["epochs"] * iters_per_epoch
    run = Run(cfg=cfg, dist=dist, name=name, run_dir=run_dir, ckpt_dir=ckpt_dir, state=state,
              labeled_loader=loaders.labeled, unlabeled_loader=loaders.unlabeled,
              partner_loader=build_partner_loader(cfg, dist.rank, dist.world_size), val_loader=val_loader,
              info=dataset_info(cfg), accumulate=accumulate, iters_per_epoch=iters_per_epoch,
              stop_at=min(total_iters, tr["max_iters"]) if tr["max_iters"] else total_iters, debug_dump=debug_dump)
    if continuing and resume_path.name in (ckpt_io.LATEST, ckpt_io.PREVIOUS):
        run.latest_iteration, run.latest_name = state.iteration, resume_path.name
    open_run_dir(run, resume, resume_point, continuing, overwrite, argv)
    announce(run, resume_path is not None)
    return run


def restore_from(state: TrainState, resume_point: ResumePoint, cfg: dict) -> None:
    """Load the resumed checkpoint into the state, refusing a config that would train another run."""
    checkpoint = resume_point.checkpoint
    if checkpoint.get("config") is not None:
        differences = ckpt_io.config_differences(checkpoint["config"], cfg)
        if differences:
            raise ConfigError(
                f"--resume {resume_point.path}: the config differs from the checkpoint's in keys that shape "
                "the run:\n  " + "\n  ".join(differences) + "\nSet them back (--opts KEY=VALUE; the run's "
                "config.yaml has them all), or train a new run under another --name."
            )
    ckpt_io.restore(state, checkpoint, str(resume_point.path))


def open_run_dir(run: Run, resume: str | None, resume_point: ResumePoint | None, continuing: bool,
                 overwrite: bool, argv: list[str] | None) -> None:
    """The start succeeded: from here on the run directory is this run's (rank 0 writes it)."""
    run_dir, ckpt_dir, state = run.run_dir, run.ckpt_dir, run.state
    set_aside = []
    if run.dist.is_main:
        if overwrite and not continuing:
            clear_outputs(run_dir, ckpt_dir)
        run_dir.mkdir(parents=True, exist_ok=True)  # saver.checkpoint_dir may be elsewhere (absolute)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        stale = ckpt_io.remove_stale_temporaries(ckpt_dir)
        for path, _ in resume_point.skipped if resume_point is not None else ():
            if path.is_file():
                # Out of the way: the next save would make an unreadable latest.pth the previous one.
                set_aside.append(path.with_name(path.name + ckpt_io.DAMAGED_SUFFIX))
                os.replace(path, set_aside[-1])
        attach_log_file(run_dir / "train.log")
        write_run_info(run_dir, run.cfg, run.dist, argv or sys.argv)
        for path in stale:
            log.info("removed %s, left by a checkpoint write that did not finish", path.name)
    barrier()
    log.info("run %s: %d process(es) on %s, run directory %s", run.name, run.dist.world_size, run.dist.device,
             run_dir)
    if run.dist.is_main and resume_point is not None and resume_point.skipped:
        reached = last_logged_iteration(run_dir)
        # metrics.jsonl says how far the run had come (to its last logged iteration, at least).
        redone = (f"the run had logged iteration {reached}, so at least {reached - state.iteration} iterations "
                  f"are done again" if reached is not None and reached > state.iteration else
                  f"the iterations after {state.iteration} that it held are done again")
        log.warning("--resume auto: %s; resuming from %s (iteration %d) instead: %s%s",
                    "; ".join(f"{p.name} {why}" if why == "it is missing" else f"{p.name} cannot be used ({why})"
                              for p, why in resume_point.skipped),
                    resume_point.path, state.iteration, redone,
                    "".join(f"; the unreadable file is kept as {p}" for p in set_aside))
    if resume_point is not None:
        log.info("resumed from %s at epoch %d, iteration %d (best mIoU %.2f)",
                 resume_point.path, state.epoch + 1, state.iteration, 100 * state.best_miou)
    elif resume == "auto":
        log.info("--resume auto: no checkpoint in %s yet, starting fresh", ckpt_dir)


def announce(run: Run, resumed: bool) -> None:
    """The run's writers, its progress line and its header."""
    cfg, dist, state = run.cfg, run.dist, run.state
    tr = cfg["trainer"]
    sup_only = tr["mode"] == "sup"
    if dist.is_main:
        run.writer = open_writer(run.run_dir, purge_step=state.iteration + 1 if resumed else None)
        run.metrics_log = MetricsLog(run.run_dir / "metrics.jsonl", state.iteration if resumed else None)
    images_per_iter = cfg["dataset"]["batch_size"] * dist.world_size * run.accumulate * (1 if sup_only else 2)
    semi_from = (None if sup_only or not 0 < tr["sup_only_epoch"] < tr["epochs"]
                 else tr["sup_only_epoch"] * run.iters_per_epoch)
    loss_parts = getattr(METHODS[tr["method"]], "console_loss_parts", None)
    run.progress = Progress(run.total_iters, images_per_iter, tr["log_every"], run.writer, run.metrics_log,
                            stop_at=run.stop_at, semi_from=semi_from, main=dist.is_main,
                            loss_parts=(lambda values: loss_parts(cfg, values)) if loss_parts is not None else None)
    header = build_run_header(
        cfg, world_size=dist.world_size, optimizer=state.optimizer, iters_per_epoch=run.iters_per_epoch * run.accumulate,
        accumulate=run.accumulate, labeled_images=count_images(run.labeled_loader),
        unlabeled_images=count_images(run.unlabeled_loader), val_images=count_images(run.val_loader),
        amp_dtype=state.amp_dtype, channels_last=state.channels_last)
    if dist.is_main:
        announce_run_header(header, run.run_dir, log)
        if not sup_only:
            log.info("%s", ground_truth_note(run.unlabeled_loader))
        if state.iteration < run.stop_at:
            log.info("training: %d optimizer steps to go; a line after the first step, then every %d steps "
                     "(and at least every %.0f s)", run.stop_at - state.iteration, tr["log_every"],
                     run.progress.heartbeat_s)


def train_epoch(run: Run, epoch: int) -> None:
    """The epoch's optimizer steps (those not done yet, when the run resumed mid-epoch)."""
    cfg, state = run.cfg, run.state
    tr = cfg["trainer"]
    state.epoch = epoch
    for loader in (run.main_loader, run.labeled_loader, run.partner_loader):
        set_epoch(loader, epoch)
    done_in_epoch = state.iteration - epoch * run.iters_per_epoch
    epoch_end = (epoch + 1) * run.iters_per_epoch
    evaluates = run.val_loader is not None and ((epoch + 1) % tr["eval_every"] == 0 or epoch == tr["epochs"] - 1)
    batches = epoch_batches(run.labeled_loader, None if tr["mode"] == "sup" else run.unlabeled_loader,
                            run.partner_loader)
    if done_in_epoch >= run.iters_per_epoch:
        batches = iter(())  # stopped after the epoch's last step, before its evaluation
    elif done_in_epoch > 0:
        # Resuming mid-epoch: replay the epoch's data stream up to where it stopped (checkpoints
        # are written between optimizer steps only, so this is a whole number of groups).
        batches = itertools.islice(batches, done_in_epoch * run.accumulate, None)
    for micro_batches in groups(batches, run.accumulate):
        next_iteration = state.iteration + 1
        before_eval = ((evaluates and next_iteration == epoch_end)
                       or (run.val_loader is not None and next_iteration == run.stop_at))
        # Images every image_every steps, and at least once before each evaluation.
        state.capture_visuals = run.writer is not None and tr["image_every"] > 0 and (
            next_iteration % tr["image_every"] == 0 or (before_eval and not run.images_since_eval))
        run.stepping = True
        metrics = train_step(state, micro_batches, cfg)
        run.stepping = False
        log_step(run, epoch, metrics)
        if tr["save_every"] and state.iteration % tr["save_every"] == 0:
            run.save("latest.pth", epoch, epoch_done=False)
        if state.iteration >= run.stop_at:
            break
        if run.stop.agreed():
            run.save("latest.pth", epoch, epoch_done=False)
            raise run.interrupted()


def log_step(run: Run, epoch: int, metrics: dict) -> None:
    """Images, the progress line (with the finite check the logged window needs) and its heartbeat."""
    state, cfg = run.state, run.cfg
    if state.visuals is not None:
        log_visuals(run.writer, state.visuals, run.info.palette, cfg["dataset"]["mean"], cfg["dataset"]["std"],
                    cfg["dataset"]["ignore_index"], state.iteration)
        state.visuals = None
        run.images_since_eval = True
    epochs = cfg["trainer"]["epochs"]
    run.progress.update(metrics, state.iteration)
    if run.progress.due(state.iteration):
        check_finite(state, run.kept_note())
        run.progress.emit(epoch=epoch, epochs=epochs, iteration=state.iteration, reduce=run.reduce_metrics)
    else:
        run.progress.heartbeat(epoch=epoch, epochs=epochs, iteration=state.iteration)


def end_epoch(run: Run, epoch: int) -> None:
    """Evaluate when due (best.pth on a new best), save latest.pth, and honour a pending stop."""
    tr, state = run.cfg["trainer"], run.state
    epoch_done = state.iteration >= (epoch + 1) * run.iters_per_epoch
    last_epoch = epoch == tr["epochs"] - 1 or state.iteration >= run.stop_at
    if run.val_loader is not None and ((epoch_done and (epoch + 1) % tr["eval_every"] == 0) or last_epoch):
        if evaluate_and_log(run, epoch):
            run.save(ckpt_io.BEST, epoch, epoch_done=epoch_done)
    run.save("latest.pth", epoch, epoch_done=epoch_done)
    if not last_epoch and run.stop.agreed():
        raise run.interrupted()


def evaluate_and_log(run: Run, epoch: int) -> bool:
    """Evaluate with every protocol the run logs; True when the selecting one reached a new best."""
    tr, state = run.cfg["trainer"], run.state
    semi = tr["mode"] != "sup" and epoch >= tr["sup_only_epoch"]
    run.results = evaluate_model(state, run.cfg, run.val_loader, semi=semi)
    (selecting, result), *also = run.results.items()
    run.images_since_eval = False
    improved = result.miou > state.best_miou
    state.best_miou = max(state.best_miou, result.miou)
    beside = "".join(f", {mode} {100 * r.miou:.2f}" for mode, r in also)
    log.info("epoch %d: mIoU %.2f%s (best %.2f)%s in %.1fs", epoch + 1, 100 * result.miou,
             f" {selecting}" if also else "", 100 * state.best_miou, beside, sum(r.seconds for r in run.results.values()))
    if run.metrics_log is not None:
        run.metrics_log.write("val", state.iteration, epoch, {
            "miou": result.miou, "pixel_acc": result.pixel_acc, **{f"miou_{mode}": r.miou for mode, r in also}},
            labels={"protocol": selecting})
    if run.writer is not None:
        run.writer.add_scalar("val/mIoU", 100 * result.miou, state.iteration)
        for mode, r in also:
            run.writer.add_scalar(f"val/mIoU_{mode}", 100 * r.miou, state.iteration)
        for cls, iou in zip(run.info.class_names, result.iou):
            if iou == iou:  # NaN marks a class absent from prediction and ground truth
                run.writer.add_scalar(f"val/IoU/{cls}", 100 * iou, state.iteration)
    return improved


def finish_run(run: Run) -> dict:
    """The final tables, the study comparison and results.json; the run's summary."""
    cfg, state = run.cfg, run.state
    if run.debug_dump:
        run.debug["params"] = {k: v.detach().cpu().clone() for k, v in state.student_module.named_parameters()}
        torch.save(run.debug, run.run_dir / f"debug_rank{run.dist.rank}.pt")
    elapsed = time.perf_counter() - run.start_time
    summary = {"run_dir": str(run.run_dir), "iterations": state.iteration, "seconds": elapsed,
               "best_miou": state.best_miou, "diagnostics": mean_diagnostics(state.history)}
    if run.results is not None:
        (selecting, result), *also = run.results.items()
        for mode, r in run.results.items():
            weights = "teacher" if state.semi_start is not None and not mode.startswith("student_") else "student"
            log.info("final evaluation (%s, %s):\n%s", mode, weights, format_table(r, run.info.class_names))
        summary["selected_by"] = selecting  # the protocol of best_miou and "final"; the run header's first
        summary["final"] = result.to_json()  # the protocol that selected best.pth
        summary["final_also"] = {mode: r.to_json() for mode, r in also}
        study = cfg["evaluation"]["compare_with"]
        if study and state.iteration < run.total_iters:
            # The study's rows ran the whole schedule; a shorter run is not comparable with them.
            log.info("no comparison with %s: this run stopped at %d of the schedule's %d iterations",
                     study, state.iteration, run.total_iters)
        elif study:
            log.info("%s", comparison_line(study, result.miou, study_row(cfg), iterations=state.iteration))
        if run.dist.is_main:
            (run.run_dir / "results.json").write_text(json.dumps(summary, indent=2))
    log.info("training finished: %d iterations in %s", state.iteration, format_duration(elapsed))
    detach_log_file()
    return summary


DIAGNOSTICS = ("kept_fraction", "kept_fraction_unrefined", "kept_accuracy", "kept_accuracy_unrefined",
               "kept_accuracy_same_share", "flipped_to_keep", "flipped_to_drop", "flipped_fraction", "threshold")


def groups(batches, size: int):
    """Consecutive lists of `size` items; a shorter tail is dropped (an optimizer step is whole)."""
    group = []
    for item in batches:
        group.append(item)
        if len(group) == size:
            yield group
            group = []


def mean_diagnostics(history: list[dict]) -> dict:
    """Mean of each pseudo-label diagnostic over the logged windows of the semi phase."""
    out = {}
    for key in DIAGNOSTICS:
        values = [h[key] for h in history if key in h]
        if values:
            out[key] = sum(values) / len(values)
    return out


def ground_truth_note(unlabeled_loader) -> str:
    """What the console's `acc` (kept accuracy) is measured on: the unlabeled images that have
    masks, which only the diagnostics read (training never sees them)."""
    dataset = unlabeled_loader.dataset
    while hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return "pseudo-label accuracy (acc): measured against the unlabeled images' masks, where they have one"
    with_mask = sum(s.mask is not None for s in samples)
    if with_mask == 0:
        return (f"pseudo-label accuracy (acc): not shown, none of the {len(samples):,} unlabeled images has a mask")
    return (f"pseudo-label accuracy (acc): measured on the {with_mask:,} of {len(samples):,} unlabeled images that "
            f"have a mask (read for this diagnostic only, never trained on)")


def check_batch_norm_batch(cfg: dict, dist: DistInfo) -> None:
    """One labeled image per process cannot train BatchNorm (the ASPP image pool sees a
    single value per channel) unless SyncBatchNorm pools several GPUs, as the release did."""
    tr = cfg["trainer"]
    labeled_only_steps = tr["mode"] == "sup" or tr["sup_only_epoch"] > 0
    sync = cfg["net"]["sync_bn"] and dist.distributed and dist.device.type == "cuda"
    if cfg["dataset"]["batch_size"] == 1 and labeled_only_steps and not sync:
        raise ConfigError(
            "dataset.batch_size = 1 gives BatchNorm one image per process in the supervised steps; "
            "use dataset.batch_size >= 2, net.sync_bn with several GPUs, or trainer.sup_only_epoch: 0"
        )


def any_rank(flag: bool, state: TrainState) -> bool:
    """True on every rank when `flag` is true on any (so all ranks stop together)."""
    if not state.dist.distributed:
        return flag
    value = torch.tensor([int(flag)], device=state.device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def check_finite(state: TrainState, kept: str = "") -> None:
    """Stop the run if any step since the last check produced a non-finite loss."""
    if state.first_nonfinite is None:
        return
    flag = state.first_nonfinite.clone()
    if state.dist.distributed:
        # Every rank must stop together, or the others would wait forever in a collective.
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    bad = int(flag)
    if bad >= 0:
        raise TrainingDiverged(f"the loss became non-finite at iteration {bad}; stopping. {kept}".rstrip())
