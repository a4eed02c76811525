"""Reliability of a run (issue 20): interrupts resume exactly, evaluation does not change
training, logged numbers are reproduced by eval.py, no run is overwritten or silently changed,
and a non-finite model is never saved. Tiny toy runs on the CPU, a few seconds each."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port

from s4mc import cli
from s4mc.config import dump_config, load_config
from s4mc.engine import loop as loop_mod
from s4mc.engine.interrupt import TrainingInterrupted
from s4mc.engine.step import train_step
from s4mc.errors import ConfigError, DataError, S4MCError

REPO = Path(__file__).resolve().parents[1]
# 16 unlabeled toy images at batch 4: 4 iterations an epoch, 8 in all, evaluated after each epoch.
SHORT = {"dataset.batch_size": 4, "trainer.epochs": 2, "trainer.eval_every": 1, "trainer.log_every": 2}


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_same_model(a: dict, b: dict) -> None:
    for key in ("model_state", "teacher_state"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key} {name}"
    for sa, sb in zip(a["optimizer_state"]["state"].values(), b["optimizer_state"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


@pytest.fixture(scope="module")
def reference(toy_root, tmp_path_factory):
    """The uninterrupted run every interrupted one must end equal to."""
    from conftest import make_toy_cfg

    out = tmp_path_factory.mktemp("reference")
    cfg = make_toy_cfg(toy_root, out, **SHORT)
    summary = loop_mod.train(cfg, name="ref")
    return {"cfg": cfg, "summary": summary, "run": out / "ref", "latest": load(out / "ref" / "checkpoints" / "latest.pth")}


def test_evaluation_does_not_change_training(reference, toy_root, toy_cfg, tmp_path):
    cfg = toy_cfg(toy_root, tmp_path, **SHORT, **{"trainer.eval_on": False})
    loop_mod.train(cfg, name="noeval")
    assert_same_model(reference["latest"], load(tmp_path / "noeval" / "checkpoints" / "latest.pth"))


def test_tensorboard_has_an_image_row_per_evaluation(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(reference["run"] / "tensorboard"))
    events.Reload()
    assert reference["cfg"]["trainer"]["image_every"] > 8  # the default, longer than this run
    (tag,) = events.Tags()["images"]
    assert [e.step for e in events.Images(tag)] == [4, 8]  # the steps before the two evaluations


@pytest.mark.parametrize("during", ["a step", "evaluation"])
def test_signal_at_a_random_moment_then_resume_equals_the_uninterrupted_run(
        during, reference, toy_root, toy_cfg, tmp_path, monkeypatch):
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    sig = rng.choice([signal.SIGINT, signal.SIGTERM])
    where = rng.choice(["before a step", "after a step"]) if during == "a step" else "during evaluation"
    at = rng.randrange(1, 8)  # the step it arrives in (a signal in the last one would find the run done)
    calls = {"step": 0}
    real_step, real_eval = loop_mod.train_step, loop_mod.evaluate_model

    def step(*args, **kwargs):
        calls["step"] += 1
        if where == "before a step" and calls["step"] == at:
            os.kill(os.getpid(), sig)
        metrics = real_step(*args, **kwargs)
        if where == "after a step" and calls["step"] == at:
            os.kill(os.getpid(), sig)
        return metrics

    def evaluate(state, *args, **kwargs):
        if where == "during evaluation" and state.iteration == 4:
            os.kill(os.getpid(), sig)
        return real_eval(state, *args, **kwargs)

    monkeypatch.setattr(loop_mod, "train_step", step)
    monkeypatch.setattr(loop_mod, "evaluate_model", evaluate)
    # What the run finds: Python's default, or SIG_IGN for SIGINT under `nohup ... &`.
    found = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    cfg = toy_cfg(toy_root, tmp_path, **SHORT)
    with pytest.raises(TrainingInterrupted, match=f"stopped by {sig.name}.*--resume auto") as info:
        loop_mod.train(cfg, name="run")
    assert info.value.signum == sig
    stopped = load(tmp_path / "run" / "checkpoints" / "latest.pth")
    # It stops at the boundary that follows the signal: within the step it arrived in, or after it.
    expected = {"before a step": at, "after a step": at, "during evaluation": 4}[where]
    assert stopped["iteration"] == expected, f"{where}, step {at}, {sig.name} (random seed {seed})"
    monkeypatch.undo()
    summary = loop_mod.train(cfg, name="run", resume="auto")
    final = load(tmp_path / "run" / "checkpoints" / "latest.pth")
    assert_same_model(reference["latest"], final)
    assert final["best_miou"] == reference["latest"]["best_miou"]
    # The summary covers the whole run, not only the part after the resume.
    assert len(final["history"]) == len(reference["latest"]["history"]) == 4
    assert summary["diagnostics"].keys() == reference["summary"]["diagnostics"].keys()
    assert {s: signal.getsignal(s) for s in found} == found  # the handlers the run found are restored
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()  # purge_step: what the stopped run logged after its checkpoint is not shown twice
    assert [e.step for e in events.Scalars("val/mIoU")] == [4, 8]
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]


def test_ctrl_c_while_python_imports_prints_one_line(tmp_path):
    """The Ctrl-C arrives as torch is imported (seconds on a cold start): a sitecustomize hook sends it
    then, so the moment is the same on any machine."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal, sys\n"
        "class CtrlCOnTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            sys.meta_path.remove(self)\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        return None\n"
        "sys.meta_path.insert(0, CtrlCOnTorch())\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(hook), str(REPO)]))
    proc = subprocess.run([sys.executable, str(REPO / "train_semi.py"), "--config",
                           str(REPO / "experiments" / "toy" / "config.yaml"), "--opts", f"output_dir={tmp_path / 'runs'}"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          # Python's own Ctrl-C handling, whatever the suite was started with (nohup)
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err = proc.stderr
    assert proc.returncode == 130 and err.count("\n") == 1 and "Traceback" not in err, err[-3000:]
    assert "interrupted by Ctrl-C" in err and "second Ctrl-C" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_the_interrupt_tests_pass_when_the_suite_starts_with_sigint_ignored(tmp_path):
    """`nohup pytest ... &` starts Python with SIGINT ignored; the suite must not depend on that."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'base'}",
         str(Path(__file__)), "-k", "random_moment and step"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.slow
def test_ctrl_c_from_a_terminal_with_loader_workers(reference, tmp_path):
    """SIGINT to the whole process group (main process and DataLoader workers), as a terminal's
    Ctrl-C sends it; then the README's command again refuses, and --resume auto finishes the run."""
    proc, args = _launch_with_workers(reference, tmp_path, workers=1)
    for line in proc.stdout:
        if " iter 2/" in line:
            time.sleep(random.uniform(0, 0.3))
            os.killpg(proc.pid, signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "stopped by SIGINT" in err and "--resume auto" in err and "Traceback" not in err, err[-2000:]
    stopped = load(tmp_path / "run" / "checkpoints" / "latest.pth")
    assert 2 <= stopped["iteration"] < 8

    assert cli.train_main(args) == 2  # the same command again must not start over
    assert cli.train_main([*args, "--resume", "auto"]) == 0
    assert_same_model(reference["latest"], load(tmp_path / "run" / "checkpoints" / "latest.pth"))


def _launch_with_workers(reference, tmp_path, workers: int):
    """train_semi.py on the reference's config with loader workers, in its own process group (as a
    terminal, GNU timeout or Slurm start it); returns (popen, args for the same run in-process)."""
    cfg = dict(reference["cfg"], output_dir=str(tmp_path))
    cfg["dataset"] = dict(cfg["dataset"], workers=workers)
    config = tmp_path / "config.yaml"
    dump_config(cfg, config)
    args = ["--config", str(config), "--name", "run", "--device", "cpu"]
    # The reference's thread count: a different one may round the convolutions differently.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(REPO / "train_semi.py"), *args], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return proc, args


def _stopped_at(err: str) -> int:
    import re

    found = re.search(r"stopped by SIGTERM after iteration (\d+); .*latest\.pth is saved", err)
    assert found, err[-3000:]
    return int(found.group(1))


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_and_resume_auto_finishes_exactly(reference, tmp_path):
    """GNU timeout, Slurm and `kill -TERM -- -PGID` signal the DataLoader workers too: the run still
    stops at a boundary with a checkpoint, and --resume auto ends equal to the uninterrupted run."""
    proc, args = _launch_with_workers(reference, tmp_path, workers=2)
    for line in proc.stdout:
        if " iter 2/" in line:
            time.sleep(random.uniform(0, 0.3))
            os.killpg(proc.pid, signal.SIGTERM)  # every process of the group, as `kill -TERM -- -PGID`
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "killed by signal" not in err, err[-3000:]
    # One line says what happened; the other, printed at the signal, that the stop is pending.
    lines = [line for line in err.strip().splitlines() if line]
    assert [line for line in lines if "stop pending" not in line] == lines[-1:] and len(lines) <= 2, err
    stopped = load(tmp_path / "run" / "checkpoints" / "latest.pth")
    assert stopped["iteration"] == _stopped_at(err) and 2 <= stopped["iteration"] < 8
    assert cli.train_main([*args, "--resume", "auto"]) == 0
    assert_same_model(reference["latest"], load(tmp_path / "run" / "checkpoints" / "latest.pth"))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the loader workers through /proc")
def test_a_worker_dying_while_a_stop_is_pending_is_still_a_stop(reference, tmp_path):
    """A worker can die of the signal before it ignores it (while it starts): the stop goes on."""
    proc, _ = _launch_with_workers(reference, tmp_path, workers=1)
    for line in proc.stdout:
        if " iter 2/" in line:
            os.kill(proc.pid, signal.SIGTERM)
            workers = _children(proc.pid)
            assert workers
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.strip().splitlines() if line]  # the pending notice, then what happened
    assert [line for line in lines if "stop pending" not in line] == lines[-1:] and len(lines) <= 2, err
    assert load(tmp_path / "run" / "checkpoints" / "latest.pth")["iteration"] == _stopped_at(err)


def test_second_start_refuses_and_failed_starts_leave_no_trace(toy_root, toy_cfg, tmp_path, capsys):
    bad = toy_cfg(toy_root, tmp_path, **{"dataset.val.data_list": str(toy_root / "splits" / "nope.txt")})
    with pytest.raises(DataError):
        loop_mod.train(bad, name="failed")
    assert not (tmp_path / "failed").exists()

    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.max_iters": 2, "trainer.eval_on": False})
    loop_mod.train(cfg, name="run")
    run = tmp_path / "run"
    first = load(run / "checkpoints" / "latest.pth")
    written = (run / "config.yaml").read_text()
    with pytest.raises(S4MCError, match=r"--resume auto.*--overwrite"):
        loop_mod.train(cfg, name="run")
    # A resume whose config changes a key that shapes the run is refused, with the change listed.
    (run / "checkpoints" / ".latest.pth.tmp999").write_bytes(b"half a checkpoint")
    changed = toy_cfg(toy_root, tmp_path, **{"trainer.max_iters": 3, "trainer.eval_on": False,
                                             "trainer.optimizer.kwargs.lr": 1.0})
    with pytest.raises(ConfigError, match=r"trainer\.optimizer\.kwargs\.lr: 0\.01 -> 1\.0"):
        loop_mod.train(changed, name="run", resume="auto")
    assert (run / "config.yaml").read_text() == written
    assert load(run / "checkpoints" / "latest.pth")["iteration"] == first["iteration"] == 2
    # The same config with a later stop resumes, and the stale temporary file goes.
    longer = toy_cfg(toy_root, tmp_path, **{"trainer.max_iters": 3, "trainer.eval_on": False})
    loop_mod.train(longer, name="run", resume="auto")
    assert load(run / "checkpoints" / "latest.pth")["iteration"] == 3
    assert not list((run / "checkpoints").glob(".*tmp*"))
    assert "removed .latest.pth.tmp999" in (run / "train.log").read_text()
    loop_mod.train(cfg, name="run", overwrite=True)
    assert load(run / "checkpoints" / "latest.pth")["iteration"] == 2


def test_a_damaged_latest_pth_falls_back_to_the_previous_checkpoint(reference, toy_root, toy_cfg, tmp_path, capsys):
    """Each save keeps the one before as latest.prev.pth; --resume auto takes the newest that loads,
    says which and what is done again, and still ends equal to the uninterrupted run."""
    cfg = toy_cfg(toy_root, tmp_path, **SHORT)
    loop_mod.train(toy_cfg(toy_root, tmp_path, **SHORT, **{"trainer.max_iters": 6}), name="run")
    ckpts = tmp_path / "run" / "checkpoints"
    assert load(ckpts / "latest.pth")["iteration"] == 6 and load(ckpts / "latest.prev.pth")["iteration"] == 4
    good_previous = (ckpts / "latest.prev.pth").read_bytes()
    latest = ckpts / "latest.pth"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    capsys.readouterr()
    loop_mod.train(cfg, name="run", resume="auto")
    out = capsys.readouterr().out
    assert "latest.pth cannot be used" in out and "resuming from" in out and "latest.prev.pth (iteration 4)" in out
    assert "at least 2 iterations are done again" in out
    assert (ckpts / "latest.pth.damaged").is_file()  # kept aside, never made the previous checkpoint
    final = load(ckpts / "latest.pth")
    assert_same_model(reference["latest"], final)
    assert final["best_miou"] == reference["latest"]["best_miou"]

    # Garbage, empty, a wrong type, or missing: the same fallback.
    from s4mc.engine.run_dir import find_resume

    for damage in (b"garbage" * 10, b"", None, "tensor"):
        folder = tmp_path / "other" / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "latest.prev.pth").write_bytes(good_previous)
        (folder / "latest.pth").unlink(missing_ok=True)
        if damage == "tensor":
            torch.save(torch.zeros(3), folder / "latest.pth")
        elif damage is not None:
            (folder / "latest.pth").write_bytes(damage)
        point = find_resume("auto", tmp_path / "other", cfg)
        assert point.path.name == "latest.prev.pth" and point.checkpoint["iteration"] == 4
        assert [p.name for p, _ in point.skipped] == ["latest.pth"]

    # Nothing loads: the refusal lists why and names what works (not --resume auto again).
    (folder / "latest.prev.pth").write_bytes(b"")
    with pytest.raises(S4MCError) as info:
        find_resume("auto", tmp_path / "other", cfg)
    assert "latest.pth:" in str(info.value) and "latest.prev.pth:" in str(info.value)
    assert "--overwrite" in str(info.value) and "Continue it with --resume auto" not in str(info.value)


def test_with_latest_pth_missing_and_best_pth_present_every_refusal_names_a_way_on(toy_root, toy_cfg, tmp_path):
    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.max_iters": 2, "trainer.epochs": 1})
    loop_mod.train(cfg, name="run")
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "latest.pth").unlink()
    (ckpts / "latest.prev.pth").unlink(missing_ok=True)
    for resume in ("auto", None):
        with pytest.raises(S4MCError) as info:
            loop_mod.train(cfg, name="run", resume=resume)
        message = str(info.value)
        assert "--overwrite" in message and "--name" in message, message
        assert "Continue it with --resume auto" not in message, message  # circular: it would fail the same way
    with pytest.raises(S4MCError, match=r"saver\.pretrain=.*best\.pth"):
        loop_mod.train(cfg, name="run", resume="auto")
    # The ways named work: saver.pretrain from best.pth under a new name, and --overwrite.
    fresh = toy_cfg(toy_root, tmp_path, **{"trainer.max_iters": 1, "trainer.epochs": 1, "trainer.eval_on": False,
                                           "saver.pretrain": str(ckpts / "best.pth")})
    loop_mod.train(fresh, name="new")
    assert load(tmp_path / "new" / "checkpoints" / "latest.pth")["iteration"] == 1
    loop_mod.train(cfg, name="run", overwrite=True)
    assert load(ckpts / "latest.pth")["iteration"] == 2


def test_best_pth_at_a_mid_epoch_stop_is_marked_as_its_iteration_and_holds_only_the_evaluated_weights(
        reference, toy_root, toy_cfg, tmp_path):
    """best.pth written at a mid-epoch stop (max_iters) is not marked as a finished epoch; it holds
    the evaluated weights and the config (a third of latest.pth), so a resume from it is refused with
    the ways on. A full best.pth from before, marked as a finished epoch, resumes exactly."""
    loop_mod.train(toy_cfg(toy_root, tmp_path, **SHORT, **{"trainer.max_iters": 2}), name="run")
    ckpts = tmp_path / "run" / "checkpoints"
    best, latest = load(ckpts / "best.pth"), load(ckpts / "latest.pth")
    assert best["iteration"] == latest["iteration"] == 2 and best["epoch"] == latest["epoch"] == 0
    assert best["evaluated_weights"] == "teacher" and set(best) == {
        "kind", "teacher_state", "format_version", "evaluated_weights", "epoch", "iteration", "semi_start",
        "best_miou", "config", "world_size"}
    assert (ckpts / "best.pth").stat().st_size < 0.4 * (ckpts / "latest.pth").stat().st_size
    for name in best["teacher_state"]:
        assert torch.equal(best["teacher_state"][name], latest["teacher_state"][name])
    # Nothing is stored twice in latest.pth: every tensor has its own storage.
    tensors = [*latest["model_state"].values(), *latest["teacher_state"].values(),
               *(s["momentum_buffer"] for s in latest["optimizer_state"]["state"].values())]
    assert len({t.untyped_storage().data_ptr() for t in tensors if t.numel()}) == sum(t.numel() > 0 for t in tensors)

    cfg = toy_cfg(toy_root, tmp_path, **SHORT)
    with pytest.raises(S4MCError, match=r"best\.pth.*--resume auto.*saver\.pretrain="):
        loop_mod.train(cfg, name="run", resume=str(ckpts / "best.pth"))
    # What 31ff105 wrote as best.pth at this stop: the full state, its epoch marked as done.
    old_style = dict(latest, epoch=latest["epoch"] + 1)
    torch.save(old_style, ckpts / "old_best.pth")
    loop_mod.train(cfg, name="run", resume=str(ckpts / "old_best.pth"))
    final = load(ckpts / "latest.pth")
    assert final["iteration"] == 8
    assert_same_model(reference["latest"], final)


def test_a_full_disk_is_named_in_one_line_and_leaves_nothing_behind(toy_root, toy_cfg, tmp_path, monkeypatch, capsys):
    """The disk fills during the third save: one line saying so, the temporary file removed, the
    previous checkpoint intact and resumable."""
    import errno

    real_save = torch.save
    calls = {"n": 0}

    class FillingDisk:
        """A file that takes 1000 bytes, then fails as a full disk does."""

        def __init__(self, f):
            self.f, self.left = f, 1000

        def write(self, data):
            if len(data) > self.left:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.left -= len(data)
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] != 3:
            return real_save(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as opened:
                return real_save(obj, FillingDisk(opened), *args, **kwargs)
        return real_save(obj, FillingDisk(f), *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    config = tmp_path / "config.yaml"
    dump_config(toy_cfg(toy_root, tmp_path, **SHORT, **{"trainer.save_every": 1, "trainer.eval_on": False}), config)
    assert cli.train_main(["--config", str(config), "--name", "full"]) == 2
    err = capsys.readouterr().err
    ckpts = tmp_path / "full" / "checkpoints"
    assert err.count("\n") == 1 and err.startswith(f"error: no space left on device at {ckpts}: "), err
    assert "Traceback" not in err and "unexpected pos" not in err
    assert f"The last good checkpoint, {ckpts / 'latest.pth'} (iteration 2), is kept" in err
    assert "Free at least" in err and "--resume auto" in err
    # No temporary file. (latest.prev.pth went before the write, which keeps two checkpoints on the disk at most.)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest.pth"]
    assert load(ckpts / "latest.pth")["iteration"] == 2
    monkeypatch.undo()
    assert cli.train_main(["--config", str(config), "--name", "full", "--resume", "auto"]) == 0


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
def test_a_failed_save_with_loader_workers_ends_the_process_in_one_line(reference, tmp_path):
    """A real write failure (a file-size limit: EFBIG) in a process with loader workers: one line,
    no temporary file, and the process exits (workers ignore SIGTERM, which multiprocessing's
    exit handler would send before waiting for them)."""
    import resource

    limit = (reference["run"] / "checkpoints" / "latest.pth").stat().st_size // 2

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cfg = dict(reference["cfg"], output_dir=str(tmp_path))
    cfg["dataset"] = dict(cfg["dataset"], workers=1)
    config = tmp_path / "config.yaml"
    dump_config(cfg, config)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "train_semi.py"), "--config", str(config), "--name", "run",
                           "--device", "cpu"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          preexec_fn=small_files)
    ckpts = tmp_path / "run" / "checkpoints"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"error: cannot write {ckpts / 'best.pth'}: File too large") or \
        proc.stderr.startswith(f"error: cannot write {ckpts / 'latest.pth'}: File too large"), proc.stderr
    assert proc.stderr.count("\n") == 1 and "--resume auto" in proc.stderr
    assert not list(ckpts.glob(".*tmp*"))


def test_an_absolute_checkpoint_dir_works(toy_root, toy_cfg, tmp_path):
    elsewhere = tmp_path / "elsewhere" / "ckpts"
    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.max_iters": 2, "trainer.eval_on": False,
                                         "saver.checkpoint_dir": str(elsewhere)})
    loop_mod.train(cfg, name="run")
    assert (tmp_path / "run" / "train.log").is_file() and load(elsewhere / "latest.pth")["iteration"] == 2
    loop_mod.train(toy_cfg(toy_root, tmp_path, **{"trainer.max_iters": 3, "trainer.eval_on": False,
                                                  "saver.checkpoint_dir": str(elsewhere)}), name="run", resume="auto")
    assert load(elsewhere / "latest.pth")["iteration"] == 3


@pytest.mark.parametrize("mode", ["semi", "warm-up", "supervised only"])
def test_eval_py_reproduces_the_logged_best_miou(mode, toy_root, toy_cfg, tmp_path, capsys):
    extra = {"semi": {}, "warm-up": {"trainer.sup_only_epoch": 1}, "supervised only": {"trainer.mode": "sup"}}[mode]
    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.max_iters": 3, "trainer.epochs": 1}, **extra)
    summary = loop_mod.train(cfg, name="run")
    best = load(tmp_path / "run" / "checkpoints" / "best.pth")
    assert best["evaluated_weights"] == ("teacher" if mode == "semi" else "student")
    assert best["best_miou"] == summary["best_miou"] > 0
    out = tmp_path / "eval.json"
    assert cli.eval_main(["--config", str(tmp_path / "run" / "config.yaml"), "--checkpoint",
                          str(tmp_path / "run" / "checkpoints" / "best.pth"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["weights"] == best["evaluated_weights"]
    assert result["miou"] == summary["best_miou"]


def test_a_non_finite_model_is_never_saved(toy_root, toy_cfg, tmp_path, monkeypatch, capsys):
    """An update that overflows a BN statistic with a finite loss: the run stops, latest.pth
    stays the last finite one, and the message (also in train.log, once) says so."""
    calls = {"n": 0}

    def overflowing(state, *args, **kwargs):
        metrics = train_step(state, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            bn = next(m for m in state.teacher.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.fill_(float("inf"))
        return metrics

    monkeypatch.setattr(loop_mod, "train_step", overflowing)
    config = tmp_path / "config.yaml"
    dump_config(toy_cfg(toy_root, tmp_path, **{"trainer.eval_on": False, "trainer.save_every": 2}), config)
    assert cli.train_main(["--config", str(config), "--name", "inf"]) == 3
    err = capsys.readouterr().err
    assert "teacher" in err and "running_var" in err and "iteration 2" in err and "is kept" in err
    ckpt = load(tmp_path / "inf" / "checkpoints" / "latest.pth")
    assert ckpt["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["teacher_state"].values() if v.is_floating_point())
    assert (tmp_path / "inf" / "train.log").read_text().count("non-finite values") == 1

    calls["n"] = 0  # the same before any checkpoint exists: no claim that one was kept
    with pytest.raises(loop_mod.TrainingDiverged, match="No checkpoint had been written yet"):
        loop_mod.train(toy_cfg(toy_root, tmp_path, **{"trainer.eval_on": False}), name="inf2")


def test_scientific_notation_and_override_errors():
    cfg = load_config(REPO / "experiments" / "toy" / "config.yaml", ["trainer.optimizer.kwargs.lr=2e-2",
                                                                      "trainer.epochs=1e1"])
    assert cfg["trainer"]["optimizer"]["kwargs"]["lr"] == 0.02 and cfg["trainer"]["epochs"] == 10
    with pytest.raises(ConfigError, match=r"override 'trainer.epochs=ten'"):
        load_config(REPO / "experiments" / "toy" / "config.yaml", ["trainer.epochs=ten"])


def test_a_file_listed_twice_in_a_split_is_refused_with_both_line_numbers(toy_root, toy_cfg, tmp_path):
    listed = (toy_root / "splits" / "labeled.txt").read_text().split()
    split = tmp_path / "labeled.txt"
    split.write_text("\n".join([*listed, "", f"{listed[2]}  "]) + "\n")  # a blank line between, trailing blanks
    cfg = toy_cfg(toy_root, tmp_path, **{"dataset.train.data_list": str(split),
                                         "dataset.train.unlabeled_list": str(toy_root / "splits" / "unlabeled.txt")})
    with pytest.raises(DataError, match=rf"{split} lists '{listed[2]}' twice, on lines 3 and {len(listed) + 2}"):
        loop_mod.train(cfg, name="dup")
    assert not (tmp_path / "dup").exists()


def test_numbers_beyond_float32_are_refused_naming_the_key(capsys):
    for opt, key in (("trainer.optimizer.kwargs.lr=1e300", "'trainer.optimizer.kwargs.lr' = 1e+300"),
                     ("dataset.mean=[1e39, 1, 1]", "'dataset.mean[0]' = 1e+39"),
                     ("trainer.optimizer.kwargs.weight_decay=.inf", "'trainer.optimizer.kwargs.weight_decay' = inf")):
        with pytest.raises(ConfigError, match=re.escape(key) + " is not a finite float32 number"):
            load_config(REPO / "experiments" / "toy" / "config.yaml", [opt])
    assert load_config(REPO / "experiments" / "toy" / "config.yaml",
                       ["trainer.optimizer.kwargs.lr=1e38"])["trainer"]["optimizer"]["kwargs"]["lr"] == 1e38
    assert cli.train_main(["--config", str(REPO / "experiments" / "toy" / "config.yaml"),
                           "--opts", "trainer.optimizer.kwargs.lr=1e300"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trainer.optimizer.kwargs.lr" in err and "Traceback" not in err


def test_a_crop_larger_than_every_image_warns_once_with_the_sizes(toy_root, toy_cfg, tmp_path, caplog):
    from s4mc.data import build_train_loaders

    with caplog.at_level("WARNING"):
        build_train_loaders(toy_cfg(toy_root, tmp_path))  # 40 px crops of 48 px images
    assert "larger than every training image" not in caplog.text
    with caplog.at_level("WARNING"):
        build_train_loaders(toy_cfg(toy_root, tmp_path, **{"dataset.train.crop.size": [64, 200]}))
    warned = [r.getMessage() for r in caplog.records if "larger than every training image" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "[64, 200]" in warned[0] and "48x48" in warned[0] and "60x60" in warned[0] and "1.25" in warned[0]


def test_worker_errors_print_one_clean_line(toy_root, toy_cfg, tmp_path, capsys):
    import shutil

    from torch.utils.data import DataLoader

    from s4mc.data import build_val_dataset

    shutil.copytree(toy_root, tmp_path / "toy")
    first = (tmp_path / "toy" / "splits" / "val.txt").read_text().split()[0]
    image = next((tmp_path / "toy").rglob(f"{first}.png"))
    image.write_bytes(image.read_bytes()[:40])  # a truncated image
    loader = DataLoader(build_val_dataset(toy_cfg(tmp_path / "toy", tmp_path)), num_workers=1, batch_size=1)
    with pytest.raises(DataError) as info:
        list(loader)
    assert "Original Traceback" in str(info.value)  # torch's worker traceback, as it arrives
    cli._report(info.value)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(image) in err and "Traceback" not in err


def test_toy_data_root_is_generated_only_in_a_toy_folder(toy_cfg, tmp_path):
    from s4mc.data import build_val_dataset

    cfg = toy_cfg(tmp_path / "toyy", tmp_path)
    with pytest.raises(DataError, match=r"dataset.val.data_root: .*toyy does not exist.*python -m s4mc.data.toy"):
        build_val_dataset(cfg)
    assert not (tmp_path / "toyy").exists()
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "s4mc.data.toy", "--help"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0 and "RuntimeWarning" not in proc.stderr


def test_priors_cli_takes_the_neighbourhood_from_the_config(toy_root, toy_cfg, tmp_path):
    from s4mc.data import priors

    config = tmp_path / "config.yaml"
    dump_config(toy_cfg(toy_root, tmp_path), config)  # neighborhood_size: 8
    assert priors.main(["--config", str(config), "--out", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["neighbors"] == 8


def test_custom_image_suffix_is_detected_as_splits_make_detects_it(tmp_path):
    import numpy as np
    from PIL import Image

    from s4mc.data.datasets import build_samples
    from s4mc.data.splits import make_split

    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for i in range(4):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / f"im{i}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / f"im{i}.png")
    make_split(tmp_path, num_labeled=2, image_dir="images", mask_dir="masks", out_dir=tmp_path / "splits")
    samples = build_samples("custom", tmp_path, tmp_path / "splits" / "labeled.txt", require_masks=True,
                            image_dir="images", mask_dir="masks")
    assert len(samples) == 2 and all(s.image.endswith(".png") for s in samples)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # the field after the state is the parent's pid
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through /proc")
def test_two_processes_log_what_eval_py_reproduces_and_resume_exactly_after_sigkill(reference, tmp_path, capsys):
    """gloo, no SyncBN: the ranks' BN statistics differ, the logged mIoU is the checkpoint's,
    and a run SIGKILLed after a checkpoint resumes to the uninterrupted run's final state."""
    cfg = dict(reference["cfg"], output_dir=str(tmp_path))
    cfg["dataset"] = dict(cfg["dataset"], batch_size=2)  # 2 ranks x 2: the same 4 iterations an epoch
    cfg["trainer"] = dict(cfg["trainer"], save_every=1)
    config = tmp_path / "config.yaml"
    dump_config(cfg, config)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))

    def launch(name, *extra, **popen):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(REPO / "train_semi.py"), "--config", str(config), "--name", name, "--device", "cpu", *extra]
        return subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True, **popen)

    straight = launch("straight")  # runs meanwhile; its few log lines fit the pipe's buffer
    killed = launch("killed")
    latest = tmp_path / "killed" / "checkpoints" / "latest.pth"
    deadline = time.time() + 300
    while killed.poll() is None and not (latest.is_file() and load(latest)["iteration"] >= 3):
        assert time.time() < deadline
        time.sleep(0.02)
    # torchrun starts each worker in its own session: kill the workers, then the launcher.
    for pid in [*_children(killed.pid), killed.pid]:
        os.kill(pid, signal.SIGKILL)
    killed.communicate(timeout=60)
    assert load(latest)["iteration"] < 8
    out = straight.communicate(timeout=300)[0]
    assert straight.returncode == 0, out[-3000:]
    resumed = launch("killed", "--resume", "auto")
    out2 = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out2[-3000:]

    run = tmp_path / "straight"
    final = load(run / "checkpoints" / "latest.pth")
    teacher_bn = [k for k in final["rank_buffers"][0]["teacher"] if k.endswith("running_var")]
    assert any(not torch.equal(final["rank_buffers"][0]["teacher"][k], final["rank_buffers"][1]["teacher"][k])
               for k in teacher_bn)  # without averaging, the ranks would hold different models
    assert_same_model(final, load(latest))
    for rank in (0, 1):
        for what in ("student", "teacher"):
            for k, v in final["rank_buffers"][rank][what].items():
                assert torch.equal(v, load(latest)["rank_buffers"][rank][what][k])
    logged = json.loads((run / "results.json").read_text())["final"]["miou"]
    out = tmp_path / "eval.json"
    assert cli.eval_main(["--config", str(run / "config.yaml"), "--checkpoint",
                          str(run / "checkpoints" / "latest.pth"), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["miou"] == logged


def _agree_worker(rank: int, port: int, signal_at: int, out_dir: str) -> None:
    import torch.distributed as dist

    from s4mc.engine.interrupt import StopRequest

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    stop = StopRequest(torch.device("cpu"), distributed=True)
    boundary = 0
    while boundary < 50:
        boundary += 1
        if rank == 1 and boundary == signal_at:
            stop.signum = signal.SIGTERM  # what the handler sets, on one rank only
        time.sleep(0.01 * rank)  # the ranks reach each boundary at different times
        if stop.agreed():
            break
    stop.restore()
    Path(out_dir, f"rank{rank}").write_text(str(boundary))
    dist.destroy_process_group()


def test_ranks_agree_on_the_stop_boundary(tmp_path):
    """A signal that reaches one rank only stops both after the same iteration, one boundary later."""
    import torch.multiprocessing as mp

    mp.spawn(_agree_worker, args=(free_port(), 3, str(tmp_path)), nprocs=2)
    assert (tmp_path / "rank0").read_text() == (tmp_path / "rank1").read_text() == "4"
