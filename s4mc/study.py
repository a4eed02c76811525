"""A paper table from one study file: every config (split) × every row × every seed, then the table.

    python -m s4mc.study run experiments/toy/study.yaml                     # one run after another, here
    python -m s4mc.study run experiments/toy/study.yaml --launcher print    # the torchrun commands
    python -m s4mc.study run experiments/toy/study.yaml --launcher slurm    # one Slurm job per run (submitit)
    python -m s4mc.study collect experiments/toy/study.yaml [--plot table.png]

A study file (YAML) names the configs (the table's columns), the rows (each a list of --opts
switches on top of every config, e.g. `trainer.mode=sup` for the supervised row), the seeds and
opts for every run; `${key.path}` in a row's switch is that key's value in the config it is
applied to. Each run is `train_semi.py --config C --seed K --name <study>/<config>/<row>/seed<K>
--resume auto`, so a study can be run again: finished runs (results.json) are skipped and
unfinished ones continue from their latest.pth.

`collect` reads every run's results.json and prints rows × configs, mean ± std over the seeds
with their number n, the published number (the run's `recipe.published_miou`) and the difference;
missing and unfinished runs are marked, never dropped silently. It refuses to average runs of one
cell whose protocols differ (environment.json's "protocol": global batch, evaluation; the training
crop from the run's config.yaml) and names the difference. It writes table.json and table.md.

As in s4mc/cli.py, the package's heavier modules (and submitit, an optional dependency for
--launcher slurm) are imported inside the functions that use them, so that `--help`, `print` and
`collect` answer without loading torch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from s4mc import REPO_ROOT
from s4mc.errors import ConfigError, S4MCError, clean_message


NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
SUBSTITUTION = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")
# Slurm job settings a study file may give (`slurm:`), with their defaults: one process (task)
# per GPU, as U2PL's and UniMatch's srun scripts launch.
SLURM_DEFAULTS = {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 1, "time_min": 60,
                  "partition": None, "signal_delay_s": 120, "max_requeues": 20, "additional": {}}


@dataclass
class Study:
    path: Path
    name: str
    configs: dict[str, Path]
    rows: dict[str, list[str]]
    extra_rows: dict[str, list[str]]
    seeds: list[int]
    opts: list[str]
    output_dir: Path
    slurm: dict = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.output_dir / self.name

    def row(self, name: str) -> list[str]:
        return (self.rows | self.extra_rows)[name]


@dataclass
class Run:
    config_name: str
    config: Path
    row: str
    seed: int
    opts: list[str]  # the study's opts, then the row's switches (substituted)
    name: str  # <study>/<config>/<row>/seed<k>, relative to output_dir
    run_dir: Path

    def argv(self) -> list[str]:
        """train_semi.py's arguments for this run."""
        return ["--config", str(self.config), "--seed", str(self.seed), "--name", self.name, "--resume", "auto",
                "--opts", *self.opts]

    @property
    def finished(self) -> bool:
        return (self.run_dir / "results.json").is_file()


def _fail(path: Path, key: str, text: str) -> ConfigError:
    return ConfigError(f"{path}: {key} {text}")


def _str_list(path: Path, key: str, value) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, key, f"must be a list of KEY=VALUE strings, got {value!r}")
    for item in value:
        if "=" not in item:
            raise _fail(path, key, f"holds {item!r}, which is not KEY=VALUE")
    return list(value)


def _rows(path: Path, key: str, value) -> dict[str, list[str]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, key, f"must map row names to lists of KEY=VALUE switches, got {type(value).__name__}")
    for name in value:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise _fail(path, f"{key}.{name}", "is not a usable row name (letters, digits, _ . -)")
    return {name: _str_list(path, f"{key}.{name}", v) for name, v in value.items()}


def load_study(path: str | os.PathLike, output_dir: str | None = None) -> Study:
    """Read and check a study file; every error names the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    known = {"name", "configs", "rows", "extra_rows", "seeds", "opts", "output_dir", "slurm"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise _fail(path, unknown[0], f"is not a study key (known: {', '.join(sorted(known))})")
    name = data.get("name") or path.stem
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise _fail(path, "name", f"must be a folder name (letters, digits, _ . -), got {name!r}")
    configs = data.get("configs")
    if not isinstance(configs, dict) or not configs:
        raise _fail(path, "configs", "must map column names (splits) to config files, e.g. {366: experiments/pascal/366/config.yaml}")
    resolved = {}
    for key, file in configs.items():
        if not NAME_RE.match(str(key)):
            raise _fail(path, f"configs.{key}", "is not a usable column name (letters, digits, _ . -)")
        file_path = Path(str(file))
        file_path = file_path if file_path.is_absolute() else REPO_ROOT / file_path
        if not file_path.is_file():
            raise _fail(path, f"configs.{key}", f"names {file}, which is not a file")
        resolved[str(key)] = file_path
    rows = _rows(path, "rows", data.get("rows"))
    if not rows:
        raise _fail(path, "rows", "must name at least one row, e.g. {s4mc: []}")
    extra = _rows(path, "extra_rows", data.get("extra_rows"))
    both = sorted(set(rows) & set(extra))
    if both:
        raise _fail(path, f"extra_rows.{both[0]}", "is also in rows")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise _fail(path, "seeds", f"must be a list of integers, got {seeds!r}")
    slurm = dict(SLURM_DEFAULTS)
    given = data.get("slurm") or {}
    if not isinstance(given, dict):
        raise _fail(path, "slurm", "must be a mapping")
    for key, value in given.items():
        if key not in SLURM_DEFAULTS:
            raise _fail(path, f"slurm.{key}", f"is not a Slurm setting here (known: {', '.join(SLURM_DEFAULTS)})")
        slurm[key] = value
    out = output_dir or data.get("output_dir") or "runs"
    out_path = Path(os.path.expanduser(str(out)))
    return Study(path=path, name=name, configs=resolved, rows=rows, extra_rows=extra, seeds=list(seeds),
                 opts=_str_list(path, "opts", data.get("opts")), output_dir=out_path if out_path.is_absolute()
                 else REPO_ROOT / out_path, slurm=slurm)


def substitute(switches: list[str], cfg: dict, where: str) -> list[str]:
    """Replace `${a.b.c}` in each switch by that key's value in the config."""

    def value(match: re.Match) -> str:
        node = cfg
        for part in match.group(1).split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"{where}: ${{{match.group(1)}}} names no key of the config")
            node = node[part]
        return str(node)

    return [SUBSTITUTION.sub(value, s) for s in switches]


def expand(study: Study, rows: list[str] | None = None, configs: list[str] | None = None,
           seeds: list[int] | None = None, opts: list[str] | None = None) -> list[Run]:
    """Every run of the study (or of the rows/configs/seeds asked for), configs outermost."""
    from s4mc.config import load_config

    rows = rows or list(study.rows)
    configs = configs or list(study.configs)
    for r in rows:
        if r not in study.rows and r not in study.extra_rows:
            raise ConfigError(f"{study.path}: no row {r!r} (rows: {', '.join([*study.rows, *study.extra_rows])})")
    for c in configs:
        if c not in study.configs:
            raise ConfigError(f"{study.path}: no config {c!r} (configs: {', '.join(study.configs)})")
    common = [*study.opts, *(opts or [])]
    runs = []
    for c in configs:
        base = load_config(study.configs[c], common)
        for r in rows:
            switches = substitute(study.row(r), base, f"{study.path}, row {r}")
            for seed in seeds or study.seeds:
                name = f"{study.name}/{c}/{r}/seed{seed}"
                runs.append(Run(config_name=c, config=study.configs[c], row=r, seed=seed,
                                opts=[*common, f"output_dir={study.output_dir}", *switches], name=name,
                                run_dir=study.output_dir / name))
    return runs


# --------------------------------------------------------------------------- launchers
def launch_local(runs: list[Run]) -> int:
    """One run after another in this process, as train_semi.py would run each."""
    from s4mc.cli import train_main

    failed = []
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.name}", flush=True)
        code = train_main(run.argv())
        if code in (128 + signal.SIGINT, 128 + signal.SIGTERM, 130):
            print(f"stopped; run the same command again to continue ({run.name} resumes)", file=sys.stderr)
            return code
        if code != 0:
            failed.append(run.name)
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def torchrun_command(run: Run, gpus: int) -> str:
    launcher = ["torchrun", f"--nproc_per_node={gpus}"] if gpus > 1 else ["python"]
    return shlex.join([*launcher, "train_semi.py", *run.argv()])


def launch_print(study: Study, runs: list[Run]) -> int:
    gpus = int(study.slurm["gpus_per_node"]) or 1
    for run in runs:
        print(torchrun_command(run, gpus))
    return 0


class TrainJob:
    """One run as a Slurm job (submitit pickles this object and calls it in every task).

    Each task runs train_semi.py's code in-process; `srun`'s variables make the tasks one process
    group (s4mc.distributed.slurm_step). On Slurm's SIGTERM before the time limit or a preemption
    the run stops at a step boundary and saves (s4mc.engine.interrupt); rank 0 then hands over to
    submitit, which calls `checkpoint` (the same run, `--resume auto`) and requeues the job.
    """

    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def __call__(self) -> str:
        from s4mc.cli import train_main

        code = train_main(self.argv)
        if code == 128 + signal.SIGTERM:
            handler = signal.getsignal(signal.SIGTERM)
            if callable(handler):  # submitit's: checkpoint, `scontrol requeue`, exit (rank 0 only)
                handler(signal.SIGTERM, None)
            return "stopped by SIGTERM; requeued"
        if code != 0:
            raise S4MCError(f"train_semi.py {shlex.join(self.argv)} exited with {code}; see the run's train.log")
        return "finished"

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.argv))


def slurm_executor(study: Study, folder: Path):
    """A submitit executor with the study's Slurm settings. The preemption signal is SIGTERM,
    the one Slurm also sends on preemption: the training loop stops on it at a step boundary,
    and DataLoader workers ignore it."""
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = "TERM"
    try:
        import submitit
    except ImportError:
        raise S4MCError("--launcher slurm needs submitit: pip install submitit") from None
    from submitit.slurm.slurm import SlurmJobEnvironment

    SlurmJobEnvironment.USR_SIG = "TERM"  # read at import; an earlier import may have read USR2
    s = study.slurm
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=int(s["max_requeues"]))
    gpus = int(s["gpus_per_node"])
    tasks = max(gpus, int(s["tasks_per_node"]))
    params = {"nodes": int(s["nodes"]), "tasks_per_node": tasks, "cpus_per_task": int(s["cpus_per_task"]),
              "timeout_min": int(s["time_min"]), "slurm_signal_delay_s": int(s["signal_delay_s"]),
              "name": study.name,
              # the job's own shell: the package importable, the preemption signal the same
              "slurm_setup": [f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
                              "export SUBMITIT_PREEMPT_SIGNAL=TERM", f"cd {shlex.quote(str(REPO_ROOT))}"]}
    if gpus:
        params["gpus_per_node"] = gpus
    if s["partition"]:
        params["slurm_partition"] = s["partition"]
    if s["additional"]:
        params["slurm_additional_parameters"] = dict(s["additional"])
    executor.update_parameters(**params)
    return executor


def launch_slurm(study: Study, runs: list[Run], wait: bool = False) -> int:
    folder = study.folder / "slurm"
    executor = slurm_executor(study, folder)
    jobs = []
    for run in runs:
        executor.update_parameters(name=f"{study.name}:{run.config_name}:{run.row}:{run.seed}")
        job = executor.submit(TrainJob(run.argv()))
        jobs.append((run, job))
        print(f"submitted {run.name} as job {job.job_id}", flush=True)
    print(f"{len(jobs)} job(s); their logs in {folder}; when they are done: python -m s4mc.study collect {study.path}")
    if not wait:
        return 0
    failed = 0
    for run, job in jobs:
        try:
            job.result()
        except Exception as exc:  # noqa: BLE001 - submitit wraps the job's own error; name the run
            failed += 1
            print(f"error: {run.name} (job {job.job_id}): {clean_message(exc).strip().splitlines()[-1]}",
                  file=sys.stderr)
    return 1 if failed else 0


# --------------------------------------------------------------------------- the table
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def protocol_facts(run_dir: Path) -> dict:
    """What must be equal for two runs' mIoUs to be averaged: the global batch and the
    evaluation (environment.json's "protocol", written from the run header), the training crop
    (the run's resolved config.yaml) and the schedule's length."""
    env_path = run_dir / "environment.json"
    try:
        protocol = json.loads(env_path.read_text())["protocol"]
    except (OSError, ValueError, KeyError):
        raise S4MCError(f"{env_path}: no run protocol recorded (a run of train_semi.py writes it at its start)") \
            from None
    cfg_path = run_dir / "config.yaml"
    crop = None
    if cfg_path.is_file():
        crop = (((yaml.safe_load(cfg_path.read_text()) or {}).get("dataset") or {}).get("train") or {}).get("crop")
    return {
        "global batch": protocol["batch"]["global"],
        "training crop": crop,
        "evaluation": [{k: e.get(k) for k in ("mode", "crop_size", "scales", "flip", "pad_label")}
                       for e in protocol.get("evaluation", [])],
        "optimizer steps": protocol["schedule"]["optimizer_steps_total"],
    }


def _run_status(run: Run) -> dict:
    if run.finished:
        results = json.loads((run.run_dir / "results.json").read_text())
        if "final" not in results:
            return {"status": "not evaluated"}
        return {"status": "done", "miou": 100 * results["final"]["miou"]}
    if (run.run_dir / "metrics.jsonl").is_file() or (run.run_dir / "checkpoints").is_dir():
        at = None
        metrics = run.run_dir / "metrics.jsonl"
        if metrics.is_file():
            lines = [x for x in metrics.read_text().splitlines() if x.strip()]
            if lines:
                at = json.loads(lines[-1]).get("iteration")
        total = None
        try:
            total = json.loads((run.run_dir / "environment.json").read_text())["protocol"]["schedule"][
                "optimizer_steps_total"]
        except (OSError, ValueError, KeyError):
            pass
        return {"status": "unfinished", "iteration": at, "of": total}
    return {"status": "missing"}


def _published(run: Run) -> float | None:
    saved = run.run_dir / "config.yaml"
    if saved.is_file():
        return ((yaml.safe_load(saved.read_text()) or {}).get("recipe") or {}).get("published_miou")
    from s4mc.config import load_config

    return load_config(run.config, run.opts)["recipe"]["published_miou"]


def collect(study: Study, rows: list[str] | None = None) -> dict:
    """The table as JSON: one cell per (row, config), every seed's state, and any refusal."""
    runs = expand(study, rows=rows)
    cells = []
    for row in rows or list(study.rows):
        for c in study.configs:
            mine = [r for r in runs if r.row == row and r.config_name == c]
            seeds = {str(r.seed): _run_status(r) for r in mine}
            done = [r for r in mine if seeds[str(r.seed)]["status"] == "done"]
            cell = {"row": row, "config": c, "seeds": seeds, "n": len(done), "mean": None, "std": None,
                    "published": _published(mine[0]), "difference": None, "refused": None}
            facts = {r.seed: protocol_facts(r.run_dir) for r in done}
            first = done[0].seed if done else None
            for r in done[1:]:
                differing = [k for k in facts[first] if facts[first][k] != facts[r.seed][k]]
                if differing:
                    k = differing[0]
                    cell["refused"] = (f"{row} on {c}: seed {first} and seed {r.seed} ran different protocols, "
                                       f"{k} {json.dumps(facts[first][k])} vs {json.dumps(facts[r.seed][k])} "
                                       f"({study.output_dir / r.name}/environment.json)")
                    break
            if done and cell["refused"] is None:
                mean, std = mean_std([seeds[str(r.seed)]["miou"] for r in done])
                cell["mean"], cell["std"] = round(mean, 2), round(std, 2)
                if cell["published"] is not None:
                    cell["difference"] = round(mean - cell["published"], 2)
            for s in seeds.values():
                if "miou" in s:
                    s["miou"] = round(s["miou"], 2)
            cells.append(cell)
    return {"study": study.name, "study_file": str(study.path), "output_dir": str(study.folder),
            "seeds": study.seeds, "configs": list(study.configs), "rows": rows or list(study.rows), "cells": cells}


def _cell_text(cell: dict) -> str:
    if cell["refused"]:
        return "not averaged: protocols differ"
    marks = []
    for state in ("missing", "unfinished", "not evaluated"):
        seeds = [s for s, v in cell["seeds"].items() if v["status"] == state]
        if seeds:
            extra = ""
            if state == "unfinished":
                extra = " (" + ", ".join(f"{v['iteration'] or 0}/{v['of'] or '?'}" for s, v in cell["seeds"].items()
                                         if v["status"] == state) + ")"
            marks.append(f"{state}: seed{'s' if len(seeds) > 1 else ''} {' '.join(seeds)}{extra}")
    value = f"{cell['mean']:.2f} ± {cell['std']:.2f} (n={cell['n']})" if cell["n"] else "–"
    return value + (f"; {'; '.join(marks)}" if marks else "")


def markdown(table: dict) -> str:
    """rows × configs; a `paper (Δ)` column beside each config that states a published number."""
    cells = {(c["row"], c["config"]): c for c in table["cells"]}
    with_paper = [c for c in table["configs"] if any(cells[(r, c)]["published"] is not None for r in table["rows"])]
    header = ["row"]
    for c in table["configs"]:
        header.append(c)
        if c in with_paper:
            header.append(f"{c} paper (Δ)")
    lines = [f"Study {table['study']} ({table['study_file']}): final mIoU %, mean ± std over seeds "
             f"{' '.join(map(str, table['seeds']))} (n = finished runs)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table["rows"]:
        line = [r]
        for c in table["configs"]:
            cell = cells[(r, c)]
            line.append(_cell_text(cell))
            if c in with_paper:
                p = cell["published"]
                line.append("–" if p is None else f"{p:.2f}" + (f" ({cell['difference']:+.2f})"
                                                                if cell["difference"] is not None else ""))
        lines.append("| " + " | ".join(line) + " |")
    refused = [c["refused"] for c in table["cells"] if c["refused"]]
    if refused:
        lines += ["", *[f"not averaged: {text}" for text in refused]]
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    """Bars per config (one per row): mean ± std, a dot per seed, a cross at the published number."""
    from s4mc.plots import pyplot

    plt = pyplot()
    cells = {(c["row"], c["config"]): c for c in table["cells"]}
    rows, configs = table["rows"], table["configs"]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 + 0.9 * len(rows) * len(configs)), 4.2))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        for j, c in enumerate(configs):
            cell, x = cells[(r, c)], j + (i - (len(rows) - 1) / 2) * width
            if cell["mean"] is not None:
                ax.bar(x, cell["mean"], width * 0.9, yerr=cell["std"], color=f"C{i}", alpha=0.75, capsize=3,
                       label=r if j == 0 else None)
                seeds = [v["miou"] for v in cell["seeds"].values() if v["status"] == "done"]
                ax.scatter([x] * len(seeds), seeds, color="black", s=8, zorder=3)
            if cell["published"] is not None:
                ax.scatter([x], [cell["published"]], marker="x", color="red", s=30, zorder=4,
                           label="published" if (i, j) == (0, 0) else None)
    ax.set_xticks(range(len(configs)), configs)
    ax.set_ylabel("final mIoU (%)")
    ax.set_title(f"{table['study']}: mean ± std over seeds (dots: each seed)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m s4mc.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="train every run of the study not finished yet")
    run_p.add_argument("study", help="study file (YAML)")
    run_p.add_argument("--launcher", choices=("local", "print", "slurm"), default="local",
                       help="local: one run after another here (default); print: the torchrun commands; "
                       "slurm: one job per run through submitit")
    run_p.add_argument("--rows", nargs="+", default=None, help="only these rows (also the study's extra_rows)")
    run_p.add_argument("--configs", nargs="+", default=None, help="only these configs (columns)")
    run_p.add_argument("--seeds", nargs="+", type=int, default=None, help="only these seeds")
    run_p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    run_p.add_argument("--output-dir", default=None, help="where the study's runs go (default: the study's "
                       "output_dir, else runs/)")
    run_p.add_argument("--wait", action="store_true", help="slurm: wait for the jobs and report failures")
    col_p = sub.add_parser("collect", help="print the table of the runs so far; write table.json and table.md")
    col_p.add_argument("study", help="study file (YAML)")
    col_p.add_argument("--rows", nargs="+", default=None, help="these rows (default: the study's rows)")
    col_p.add_argument("--output-dir", default=None, help="where the study's runs are")
    col_p.add_argument("--json", default=None, help="default: <output_dir>/<study>/table.json")
    col_p.add_argument("--markdown", default=None, help="default: <output_dir>/<study>/table.md")
    col_p.add_argument("--plot", default=None, help="also draw the table here (PNG; needs matplotlib)")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.study, args.output_dir)
        if args.command == "collect":
            return _collect(study, args)
        runs = expand(study, rows=args.rows, configs=args.configs, seeds=args.seeds, opts=args.opts)
        todo = [r for r in runs if not r.finished]
        if len(todo) < len(runs):
            print(f"{len(runs) - len(todo)} of {len(runs)} run(s) already finished (results.json), skipped",
                  file=sys.stderr if args.launcher == "print" else sys.stdout)
        if args.launcher == "print":
            return launch_print(study, todo)
        if args.launcher == "slurm":
            return launch_slurm(study, todo, wait=args.wait)
        return launch_local(todo)
    except S4MCError as exc:
        print(f"error: {clean_message(exc)}", file=sys.stderr)
        return 2


def _collect(study: Study, args) -> int:
    if args.plot:
        from s4mc.plots import pyplot

        pyplot()  # a missing matplotlib is said before anything is read
    table = collect(study, rows=args.rows)
    text = markdown(table)
    print(text, end="")
    json_path = Path(args.json) if args.json else study.folder / "table.json"
    md_path = Path(args.markdown) if args.markdown else study.folder / "table.md"
    for path, content in ((json_path, json.dumps(table, indent=2) + "\n"), (md_path, text)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    print(f"wrote {json_path} and {md_path}")
    if args.plot:
        plot(table, Path(args.plot))
        print(f"wrote {args.plot}")
    refused = [c["refused"] for c in table["cells"] if c["refused"]]
    for text in refused:
        print(f"error: refusing to average {text}", file=sys.stderr)
    return 2 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
