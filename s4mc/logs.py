"""Console progress and TensorBoard scalars, from rank 0 only."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("s4mc")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time, so a replaced stdout (a test's capture,
    a notebook) never leaves the handler holding a closed stream."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


class _EarlyRecords(logging.Handler):
    """Keeps what rank 0 logs before the run directory exists, for `attach_log_file` to write."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def setup_logging(rank: int, log_file: str | Path | None = None) -> logging.Logger:
    """Rank 0 logs INFO to the console (and the run's log file); other ranks only warnings."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    console = _StdoutHandler()
    console.setFormatter(fmt)
    log.addHandler(console)
    if log_file is not None and rank == 0:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(fmt)
        log.addHandler(handler)
    elif rank == 0:
        log.addHandler(_EarlyRecords())
    return log


def attach_log_file(log_file: str | Path) -> None:
    """Start writing the log to `log_file`, beginning with what was logged before it existed."""
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(fmt)
    for early in [h for h in log.handlers if isinstance(h, _EarlyRecords)]:
        log.removeHandler(early)
        for record in early.records:
            handler.handle(record)
    log.addHandler(handler)


def detach_log_file() -> None:
    """Close the run's log file (a later run in the same process must not write to it)."""
    for handler in list(log.handlers):
        if isinstance(handler, logging.FileHandler):
            log.removeHandler(handler)
            handler.close()


def log_fatal_to_file(message: str, prefix: str = "error: ") -> None:
    """Write how the run ended to its log file only (the console shows it already), then close
    the file, so nothing from a later run in this process lands in it."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s%s", (prefix, message), None)
    for handler in list(log.handlers):
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
            log.removeHandler(handler)
            handler.close()


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


# A line at least this often (seconds) when `log_every` iterations take longer, so a slow
# machine shows progress within seconds of the first step and never falls silent for minutes.
HEARTBEAT_S = 30.0


class Progress:
    """Averages step metrics on the device and prints one line every `every` iterations.

    Summing stays on the device; the only host read is at print time, once per
    `every` steps, which is also when a non-finite loss is detected.

    Between those lines, rank 0 alone (`main`) prints a short line after the first step and
    then whenever `heartbeat_s` seconds pass without one (`heartbeat`): no collective, so
    the ranks never need to agree on a clock. The ETA counts to `stop_at` (trainer.max_iters
    when set) at the pace of the current phase: before `semi_from` (the supervised warm-up,
    whose steps are cheaper) it is a lower bound and says so.
    """

    def __init__(self, total_iters: int, images_per_iter: int, every: int, writer=None, metrics_log=None, *,
                 stop_at: int | None = None, semi_from: int | None = None, main: bool = True,
                 heartbeat_s: float = HEARTBEAT_S, loss_parts=None):
        self.total_iters = total_iters
        self.stop_at = stop_at if stop_at is not None else total_iters
        self.semi_from = semi_from
        self.metrics_log = metrics_log
        self.images_per_iter = images_per_iter
        self.every = max(1, every)
        self.writer = writer
        self.main = main
        self.heartbeat_s = heartbeat_s
        self.loss_parts = loss_parts  # values -> console text of the loss and its parts (a method's own)
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.window_start = time.perf_counter()
        self.last_line = self.window_start
        self.phase_time = self.window_start
        self.phase_iter: int | None = None
        self.rate: float | None = None  # seconds per step at the current phase's pace
        self.lines = 0

    def update(self, metrics: dict[str, torch.Tensor], iteration: int | None = None) -> None:
        for key, value in metrics.items():
            value = value.detach().double()
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.count += 1
        if iteration is not None:
            if self.phase_iter is None:
                self.phase_iter = iteration - 1  # this process's first step (a fresh start or a resume)
            if self.semi_from is not None and iteration == self.semi_from + 1:
                # The semi phase's pace from its second step on: the first follows the warm-up's
                # last evaluation, whose time would read as one very slow step.
                self.phase_iter, self.phase_time = iteration, time.perf_counter()

    def due(self, iteration: int) -> bool:
        return iteration % self.every == 0 or iteration == self.stop_at

    def eta(self, iteration: int, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        done = iteration - (self.phase_iter if self.phase_iter is not None else iteration - self.count)
        if done >= 1:
            self.rate = (now - self.phase_time) / done
        if self.rate is None:  # no step timed yet in this process
            return "?"
        remaining = max(self.stop_at - iteration, 0)
        text = format_duration(self.rate * remaining)
        if self.semi_from is not None and iteration <= self.semi_from < self.stop_at:
            text = f"at least {text} (warm-up pace)"
        return text

    def _position(self, epoch: int, epochs: int, iteration: int) -> str:
        text = f"epoch {epoch + 1}/{epochs} iter {iteration}/{self.total_iters} ({100.0 * iteration / self.total_iters:.1f}%)"
        if self.stop_at < self.total_iters:
            text += f", stops at {self.stop_at} (trainer.max_iters)"
        return text

    def heartbeat(self, *, epoch: int, epochs: int, iteration: int) -> None:
        """Rank 0: a short line after the first step, then when `heartbeat_s` passed without one."""
        if not self.main or self.count == 0:
            return
        now = time.perf_counter()
        first = self.lines == 0 and iteration == (self.phase_iter or 0) + 1
        per_step = (now - self.window_start) / self.count
        if not first:
            if now - self.last_line < self.heartbeat_s:
                return
            if (self.every - iteration % self.every) * per_step < self.heartbeat_s / 3:
                return  # the full line comes soon enough
        loss = self.sums.get("loss")
        loss_text = f"loss {float(loss) / self.count:.4f} (rank 0, {self.count} step(s)) | " if loss is not None else ""
        log.info("%s | %s%.2f s/step | eta %s | a full line every %d steps", self._position(epoch, epochs, iteration),
                 loss_text, per_step, self.eta(iteration, now), self.every)
        self.last_line = now
        self.lines += 1

    def emit(self, *, epoch: int, epochs: int, iteration: int, reduce=None) -> dict[str, float]:
        """Print and log the averages since the last call; return them as floats."""
        means = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        if reduce is not None:
            means = reduce(means)
        values = {k: float(v) for k, v in means.items()}
        now = time.perf_counter()
        elapsed = now - self.window_start
        values["images_per_s"] = self.count * self.images_per_iter / max(elapsed, 1e-9)
        mem = ""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            values["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            mem = f" mem {values['peak_mem_gb']:.1f}G"
        log.info("%s | %s | lr %.2e | %.1f img/s%s | eta %s", self._position(epoch, epochs, iteration),
                 " ".join(self.format_parts(values)), values.get("lr", float("nan")), values["images_per_s"], mem,
                 self.eta(iteration, now))
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"train/{key}", value, iteration)
        if self.metrics_log is not None:
            self.metrics_log.write("train", iteration, epoch, values)
        self.sums, self.count, self.window_start = {}, 0, now
        self.last_line = now
        self.lines += 1
        return values

    def format_parts(self, values: dict[str, float]) -> list[str]:
        """The loss, its parts and the pseudo-label diagnostics, as the console line shows them."""
        parts = self.loss_parts(values) if self.loss_parts is not None else None
        if parts is None:
            parts = [f"loss {values.get('loss', float('nan')):.4f}", f"sup {values.get('loss_sup', float('nan')):.4f}"]
            if "loss_unsup" in values:
                parts.append(f"unsup {values['loss_unsup']:.4f}")
            if "loss_contrastive" in values:
                parts.append(f"con {values['loss_contrastive']:.4f}")
        if "threshold" in values:
            gamma = values["threshold"]
            parts.append(f"γ {gamma:.3f}" if gamma == 0 or abs(gamma) >= 0.001 else f"γ {gamma:.1e}")
            parts.append(f"kept {100 * values['kept_fraction']:.1f}% (unrefined {100 * values['kept_fraction_unrefined']:.1f}%)")
        elif "kept_fraction" in values:  # a fixed threshold (UniMatch alone): no γ, no refinement
            parts.append(f"kept {100 * values['kept_fraction']:.1f}%")
        if "flipped_to_keep" in values:
            share = f" ({100 * values['flipped_fraction']:.1f}%)" if "flipped_fraction" in values else ""
            parts.append(f"refine +{values['flipped_to_keep']:.0f}/-{values['flipped_to_drop']:.0f} px{share}")
        if "kept_accuracy" in values:
            same = (f", same share {100 * values['kept_accuracy_same_share']:.1f}%"
                    if "kept_accuracy_same_share" in values else "")
            parts.append(f"acc {100 * values['kept_accuracy']:.1f}% (unrefined {100 * values['kept_accuracy_unrefined']:.1f}%{same})")
        return parts


class MetricsLog:
    """The run's logged numbers as JSON lines (`metrics.jsonl` in the run directory), so a run
    can be plotted or compared without TensorBoard (`python -m s4mc.plots`).

    Each line is {"kind": "train" | "val", "iteration", "epoch", ...values}. On resume the lines
    past the resumed iteration are dropped, so the file never repeats iterations.
    """

    def __init__(self, path: Path, resume_iteration: int | None = None):
        self.path = Path(path)
        if resume_iteration is None:
            self.path.write_text("")
        elif self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("iteration", 0) <= resume_iteration]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, kind: str, iteration: int, epoch: int, values: dict, labels: dict | None = None) -> None:
        """`values` are numbers; `labels` strings kept as they are (a val record's "protocol")."""
        record = {"kind": kind, "iteration": int(iteration), "epoch": int(epoch) + 1,
                  **{k: float(v) for k, v in values.items()}, **(labels or {})}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def open_writer(run_dir: Path, purge_step: int | None = None):
    """A TensorBoard writer under the run directory (None if tensorboard is missing).

    A resumed run passes `purge_step` (the first iteration it will log), so events that the
    interrupted run wrote after its checkpoint are dropped instead of shown twice."""
    try:  # imported here: tensorboard is optional and slow to import
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboard is in requirements.txt
        log.warning("tensorboard is not installed: no event files will be written")
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)


def log_visuals(writer, visuals: dict, palette, mean, std, ignore_index: int, step: int) -> None:
    """Write image | teacher prediction | masked pseudo-label | ground truth rows to TensorBoard.

    Ignored pixels (dropped by the S4MC mask, or unlabeled) are drawn black.
    """
    colours = torch.tensor(palette, dtype=torch.uint8)
    black = torch.zeros(3, dtype=torch.uint8)

    def colour(label):
        label = label.long()
        valid = (label != ignore_index) & (label < len(colours))
        rgb = colours[label.clamp(0, len(colours) - 1)]
        rgb[~valid] = black
        return rgb.permute(0, 3, 1, 2)

    image = visuals["image"] * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    rows = [image.clamp(0, 255).to(torch.uint8)]
    rows += [colour(visuals[key]) for key in ("prediction", "pseudo_label", "ground_truth")]
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)  # samples across, kinds down
    writer.add_image("unlabeled/image|teacher|pseudo-label|ground-truth", grid, step)


ROW_NAMES = {"supervised": "supervised only", "supervised_all": "all labels", "cutmix_seg": "CutMix-Seg",
             "s4mc": "S4MC", "s4mc_psi": "S4MC ψ"}


def study_row(cfg: dict) -> str:
    """Which row of benchmarks/variants.py a config is (its name in a study JSON)."""
    unsup = cfg["trainer"]["unsupervised"]
    if cfg["trainer"]["mode"] == "sup":
        return "supervised"
    if cfg["trainer"]["method"] != "mean_teacher":  # another method's rows: <method>, s4mc_<method>
        return ("s4mc_" if unsup["refine"] else "") + cfg["trainer"]["method"]
    if not unsup["refine"]:
        return "cutmix_seg"
    return "s4mc_psi" if unsup["strong_aug"] else "s4mc"


def comparison_line(study_path: str | Path, miou: float, row: str) -> str:
    """One line setting this run's mIoU beside a study's rows at the same budget and start.

    The study JSON is what `benchmarks/variants.py --json` writes; a missing or unreadable file
    gives a line that says so instead of failing a finished run.
    """
    path = Path(study_path)
    try:
        study = json.loads(path.read_text(encoding="utf-8"))
        rows = study["variants"]
        seeds = " ".join(map(str, study["seeds"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"no comparison: cannot read the study {path} ({type(e).__name__}: {e})"

    def cell(name):
        r = rows[name]
        return f"{ROW_NAMES.get(name, name)} {r['mean']:.2f} ± {r['std']:.2f}"

    shown = [n for n in ("supervised", row) if n in rows]
    parts = [f"this run ({ROW_NAMES.get(row, row)}) {100 * miou:.2f} mIoU"]
    parts += [cell(n) for n in dict.fromkeys(shown)]
    if row != "supervised" and "supervised" in rows:
        parts.append(f"{100 * miou - rows['supervised']['mean']:+.2f} over supervised only")
    return (f"same budget and starting point, {path.name} (benchmarks/variants.py, mean ± std over seeds "
            f"{seeds}): " + " | ".join(parts))
