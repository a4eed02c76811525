"""Against a real Slurm (issue 32): a 2-task `srun python train_semi.py` run (gloo), a study of 2 rows ×
2 seeds through submitit then `collect`, and a job stopped by the scheduler's SIGTERM, requeued and
resumed, ending bit-identical to the uninterrupted run.

Skipped where `sbatch` is absent. With SLURM_CONF pointing at a running cluster the tests use it;
otherwise (as root) they start a single-node one with scripts/slurm/local_cluster.sh and stop it at
the end. The runs are tiny (48 px toy, width-8 encoder, no loader workers) so that they fit the
suite's time on 2 cores."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "scripts" / "slurm" / "local_cluster.sh"
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if shutil.which("sbatch") is None:
        pytest.skip("needs Slurm: apt-get install -y slurm-wlm munge (the tests then start a local cluster)")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if env.get("SLURM_CONF") and subprocess.run(["sinfo", "-h"], env=env, capture_output=True, timeout=60).returncode == 0:
        yield env
        return
    if os.geteuid() != 0:
        pytest.skip("starting a local Slurm cluster needs root (slurmd); or export SLURM_CONF of a running one")
    env["S4MC_SLURM_DIR"] = str(tmp_path_factory.mktemp("slurm") / "cluster")
    env["S4MC_SLURM_PORT"] = str(free_port())
    started = subprocess.run([str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    env["SLURM_CONF"] = str(Path(env["S4MC_SLURM_DIR"]) / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run([str(CLUSTER), "stop"], env=env, capture_output=True, timeout=120)


def tiny_config(toy_root: Path, folder: Path, **trainer) -> Path:
    data = yaml.safe_load((REPO / "experiments" / "toy" / "config.yaml").read_text())
    data["output_dir"] = str(folder / "runs")
    data["dataset"].update(workers=0, batch_size=2)
    for split in ("train", "val"):
        data["dataset"][split]["data_root"] = str(toy_root)
    data["dataset"]["train"].update(data_list=str(toy_root / "splits" / "labeled.txt"),
                                    unlabeled_list=str(toy_root / "splits" / "train_all.txt"))
    data["dataset"]["train"]["crop"]["size"] = [40, 40]
    data["dataset"]["val"]["data_list"] = str(toy_root / "splits" / "val.txt")
    data["net"]["encoder"].update(pretrained=None, kwargs={"width": 8})  # the shipped toy encoder is width 16
    data["evaluation"]["compare_with"] = None
    data["trainer"].update({"epochs": 1, "sup_only_epoch": 0, "log_every": 1, "eval_every": 1, **trainer})
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def job_field(env: dict, job: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True, timeout=60).stdout
    match = re.search(rf"\b{name}=(\S+)", out)
    return match.group(1) if match else ""


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.1)


def wait_done(env: dict, job: str, timeout: float = 400) -> str:
    done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    wait_for(lambda: job_field(env, job, "JobState") in done, timeout, f"job {job}")
    return job_field(env, job, "JobState")


def tensors(obj, prefix=""):
    """Every tensor of a checkpoint, by path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}/{i}")


def test_srun_two_tasks_form_one_process_group(slurm, toy_root, tmp_path):
    """srun starts 2 tasks of train_semi.py; they are the 2 ranks of one gloo group, and the mIoU
    the run logs is what eval.py gets from its checkpoint."""
    config = tiny_config(toy_root, tmp_path, max_iters=3)
    proc = subprocess.run(["srun", "--nodes=1", "--ntasks=2", "--cpus-per-task=1", sys.executable, str(REPO / "train_semi.py"),
                           "--config", str(config), "--name", "ddp", "--device", "cpu"],
                          env=slurm, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp"]  # not two runs racing
    ckpt = torch.load(run / "checkpoints" / "latest.pth", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng_states"]) == 2
    assert "2 process(es)" in (run / "train.log").read_text()
    assert proc.stdout.count("iter 3/") == 1  # rank 0 alone logs
    logged = json.loads((run / "results.json").read_text())["final"]["miou"]
    from s4mc import cli

    out = tmp_path / "eval.json"
    assert cli.eval_main(["--config", str(run / "config.yaml"), "--checkpoint", str(run / "checkpoints" / "latest.pth"),
                          "--json", str(out)]) == 0
    assert json.loads(out.read_text())["miou"] == logged


def test_a_study_through_submitit_then_collect(slurm, toy_root, tmp_path):
    """2 rows × 2 seeds, one job each; one of them gets the preemption SIGTERM mid-run, is
    requeued by submitit and resumes. `collect` then averages each row's two seeds."""
    config = tiny_config(toy_root, tmp_path, epochs=2)
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({
        "name": "mini", "configs": {"tiny": str(config)}, "rows": {"supervised": ["trainer.mode=sup"], "s4mc": []},
        "seeds": [0, 1], "opts": ["recipe.published_miou=50"], "output_dir": str(tmp_path / "runs"),
        "slurm": {"cpus_per_task": 1, "time_min": 10, "signal_delay_s": 30}}))
    cmd = [sys.executable, "-m", "s4mc.study", "run", str(study_file), "--launcher", "slurm"]
    proc = subprocess.run(cmd, env=slurm, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = dict(re.findall(r"submitted (\S+) as job (\d+)", proc.stdout))
    assert sorted(jobs) == sorted(f"mini/tiny/{r}/seed{s}" for r in ("supervised", "s4mc") for s in (0, 1))
    preempted = "mini/tiny/s4mc/seed1"
    metrics = tmp_path / "runs" / preempted / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and metrics.read_text().strip(), 300, f"{preempted} to train")
    # what Slurm sends the job's tasks on preemption (and, with submitit's --signal, before the limit)
    subprocess.run(["scancel", "--signal=TERM", jobs[preempted]], env=slurm, check=True, timeout=60)
    for name, job in jobs.items():
        assert wait_done(slurm, job) == "COMPLETED", name
    assert job_field(slurm, jobs[preempted], "Restarts") == "1"
    log = (tmp_path / "runs" / preempted / "train.log").read_text()
    assert "stopped by SIGTERM" in log and re.search(r"resumed from .*latest\.pth at epoch \d+, iteration ([1-9]|1\d|2[0-3]) ", log)

    from s4mc import study

    assert study.main(["collect", str(study_file)]) == 0
    table = json.loads((tmp_path / "runs" / "mini" / "table.json").read_text())
    for cell in table["cells"]:
        seeds = [100 * json.loads((tmp_path / "runs" / "mini" / "tiny" / cell["row"] / f"seed{s}" / "results.json")
                                  .read_text())["final"]["miou"] for s in (0, 1)]
        assert cell["n"] == 2 and cell["mean"] == round(statistics.fmean(seeds), 2)
        assert cell["published"] == 50 and cell["difference"] == round(statistics.fmean(seeds) - 50, 2)
    assert "| supervised |" in (tmp_path / "runs" / "mini" / "table.md").read_text()
    again = subprocess.run(cmd, env=slurm, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "4 of 4 run(s) already finished" in again.stdout and "submitted" not in again.stdout


def test_time_limit_signal_requeue_resume_is_bit_identical(slurm, toy_root, tmp_path):
    """scripts/slurm/train.sbatch with a short time limit: the SIGTERM its `--signal=B:TERM@<s>`
    sends the batch script (here sent by scancel at a known moment of training, so the test does
    not depend on when Slurm's timer fires) stops the run at a step boundary with a save; the
    script requeues the job, which resumes and ends equal, tensor by tensor, to a job never stopped."""
    config = tiny_config(toy_root, tmp_path, epochs=2)

    def submit(name):
        return subprocess.run(["sbatch", "--parsable", "--time=3", "--signal=B:TERM@60", "--cpus-per-task=1",
                               f"--output={tmp_path / name}.out", str(REPO / "scripts" / "slurm" / "train.sbatch"),
                               "--config", str(config), "--name", name, "--device", "cpu"],
                              env=dict(slurm, S4MC_REPO=str(REPO)), cwd=tmp_path, capture_output=True, text=True,
                              check=True, timeout=60).stdout.strip().split(";")[0]

    straight, stopped = submit("straight"), submit("stopped")
    metrics = tmp_path / "runs" / "stopped" / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and metrics.read_text().strip(), 300, "the run to train")
    subprocess.run(["scancel", "--batch", "--signal=TERM", stopped], env=slurm, check=True, timeout=60)
    assert wait_done(slurm, stopped) == "COMPLETED" and wait_done(slurm, straight) == "COMPLETED"
    assert job_field(slurm, stopped, "Restarts") == "1" and job_field(slurm, straight, "Restarts") == "0"
    out = (tmp_path / "stopped.out").read_text()
    assert "requeueing job" in out and "(restart 1)" in out
    log = (tmp_path / "runs" / "stopped" / "train.log").read_text()
    at = int(re.search(r"stopped by SIGTERM after iteration (\d+)", log).group(1))
    assert 0 < at < 24 and f"iteration {at} " in log.split("stopped by SIGTERM")[1]
    a = torch.load(tmp_path / "runs" / "straight" / "checkpoints" / "latest.pth", weights_only=True)
    b = torch.load(tmp_path / "runs" / "stopped" / "checkpoints" / "latest.pth", weights_only=True)
    ta, tb = dict(tensors(a)), dict(tensors(b))
    assert ta.keys() == tb.keys() and len(ta) > 100
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert different == []
    assert a["iteration"] == b["iteration"] == 24 and a["best_miou"] == b["best_miou"]
    print(f"stopped after iteration {at} of 24, requeued, resumed: {len(ta)} tensors of the final checkpoints equal")
