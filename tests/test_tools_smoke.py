"""Every benchmark and command-line tool runs (issue 35).

TOOLS is a table with one row per entry point (a script in benchmarks/, train_semi.py, eval.py, a
`python -m s4mc.…` module): the arguments it runs with, in a subprocess from the repository root, on
the CPU at the smallest sizes, and the function that parses what it printed and checks the figures. Rows whose runs other tests already make (`covered_by`) only start, with --help. The Python
rows run one after the other in one interpreter, each as `python -m` / `python path` would (runpy), so
that the torch import (2-4 s of CPU) is paid once, not per row; a row marked `alone`, and the shell
script, get a process of their own. `test_every_entry_point_has_a_row` fails for a tool without a
row, so a new or renamed one gets one.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
# A tiny model on whatever config a tool loads: the figures only have to parse.
TINY_NET = ["net.encoder.type=resnet_tiny", "net.encoder.kwargs.width=8", "net.decoder.kwargs.inner_planes=16",
            "net.decoder.kwargs.low_conv_planes=16"]


def positive(*values: float) -> None:
    for v in values:
        assert math.isfinite(v) and v > 0, values


def numbers(pattern: str, text: str, count: int | None = None) -> list[tuple[float, ...]]:
    """Every match of `pattern` in `text`, its groups as floats; `count` matches if given, else at least one."""
    found = [tuple(float(g) for g in m.groups()) for m in re.finditer(pattern, text, re.MULTILINE)]
    assert (len(found) == count) if count is not None else found, f"{pattern!r}: {len(found)} matches in\n{text}"
    return found


def json_lines(text: str, key: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{") and f'"{key}"' in line]


# ---- parsers, one per command; each takes (stdout, the row's tmp folder) -------------------------------------

def check_method_json(d: dict, shape: list[int]) -> None:
    assert d["shape"] == shape and d["losses_agree"] is True, d
    assert len(d["ours_s"]) == len(d["release_style_s"]) == d["runs"]
    positive(d["ours_median_s"], d["release_style_median_s"], d["speedup"], *d["ours_s"], *d["release_style_s"])


def check_method(out: str, tmp: Path) -> None:
    ours, release, kept = numbers(rf"^losses: ours ({NUM})  release-style ({NUM})  agree True; kept ({NUM})$", out, 1)[0]
    positive(ours, release)
    assert ours == pytest.approx(release, rel=1e-4) and 0 < kept <= 1
    for first, second, median in numbers(rf"^(?:ours|release-style) +runs \(s\): ({NUM}) ({NUM})  median ({NUM})$", out, 2):
        positive(first, second, median)
        assert median == pytest.approx((first + second) / 2, abs=2e-4)  # printed to 4 decimals
    positive(*numbers(rf"^speed-up \(release-style / ours\): ({NUM})x$", out, 1)[0])
    [d] = json_lines(out, "benchmark")
    check_method_json(d, [2, 21, 24, 24])
    assert "aten::" in (tmp / "profile.txt").read_text()


def check_step_json(d: dict) -> None:
    assert d["device"] == "cpu" and d["batch"] == "2+2" and d["size"] == 33, d
    assert len(d["step_times_s"]) >= 1 and d["peak_mem_gib"] is None
    assert 0 <= d["first_step_s"] < 60  # rounded to 0.01 s
    positive(d["median_step_s"], d["images_per_s"], d["s4mc_loss_s"], d["s4mc_loss_share"], *d["step_times_s"])
    assert d["images_per_s"] == pytest.approx(4 / d["median_step_s"], rel=0.01)


def check_gpu_checks(out: str, tmp: Path) -> None:
    steps = json_lines(out, "setting")
    assert [d["setting"] for d in steps] == ["release-baseline", "s4mc", "s4mc", "s4mc"], out
    assert [(d["amp"], d["channels_last"], d["compile"]) for d in steps] == [
        ("off", False, False), ("bf16", True, False), ("bf16", True, False), ("bf16", True, False)]
    for d in steps:
        check_step_json(d)
    [loss] = json_lines(out, "benchmark")
    check_method_json(loss, [2, 21, 33, 33])
    assert loss["ground_truth"] and loss["backward"]
    summary = numbers(rf"^batch 2\+2 compile=False first +({NUM}) s  step +({NUM}) ms +({NUM}) img/s  peak None GiB  "
                      rf"loss ({NUM}) ms = ({NUM})% of the step$", out, 4)
    for row, d in zip(summary, steps):
        positive(*row[1:])
        assert row[2] == pytest.approx(d["images_per_s"], abs=0.06)
    assert re.search(r"^elapsed \d+s, 0 command\(s\) failed$", out, re.MULTILINE), out
    gpu_out = tmp / "gpu_out"
    assert len((gpu_out / "step.jsonl").read_text().splitlines()) == 4
    assert "aten::" in (gpu_out / "profile_compile.txt").read_text()
    assert json.loads((gpu_out / "method.txt").read_text().splitlines()[-1]) == loss


def check_data(out: str, tmp: Path) -> None:
    rates = numbers(rf": +({NUM}) img/s", out, 3)
    positive(*(r[0] for r in rates))
    assert "crop 64, 2 images x 1 runs" in out


def check_checkpoint_size(out: str, tmp: Path) -> None:
    ((latest,),), ((best,),) = numbers(rf"^latest\.pth +({NUM}) MB", out, 1), numbers(rf"^best\.pth +({NUM}) MB", out, 1)
    positive(latest, best)
    assert best < latest / 2, out  # best.pth: the evaluated weights only
    (apart, together), = numbers(rf"the keys apart: ({NUM}) MB; together: ({NUM}) MB", out, 1)
    assert apart == together, out  # no tensor is stored twice
    assert "evaluated_weights" in out and "optimizer_state" not in out.split("best.pth keys:")[1]


def check_loss_trace(out: str, tmp: Path) -> None:
    lines = [line.split() for line in out.splitlines() if line.startswith("s4mc it=")]
    assert [line[1] for line in lines] == ["it=1", "it=2"], out
    for line in lines:
        values = dict(item.split("=") for item in line[2:])
        assert {"loss", "loss_sup", "loss_unsup", "kept_fraction", "threshold", "lr"} <= set(values)
        assert all(math.isfinite(float(v)) for v in values.values())
        positive(float(values["loss"]), float(values["lr"]))
        assert float(values["loss"]) == pytest.approx(float(values["loss_sup"]) + float(values["loss_unsup"]), rel=1e-5)
        assert 0 < float(values["kept_fraction"]) <= 1
    assert re.search(r"^s4mc student=[0-9a-f]{16} teacher=[0-9a-f]{16}$", out, re.MULTILINE)


def check_margin_variants(out: str, tmp: Path) -> None:
    rows = re.findall(rf"^(loop|amax|topk) +margin ({NUM}) ms   full loss fwd\+bwd with gt ({NUM}) ms$", out, re.MULTILINE)
    assert [r[0] for r in rows] == ["loop", "amax", "topk"], out
    positive(*(float(v) for r in rows for v in r[1:]))


def check_toy_pretrain(out: str, tmp: Path) -> None:
    [(miou,)] = numbers(rf"^wrote .*encoder\.pth in \d+ s \(pool validation mIoU ({NUM})\)$", out, 1)
    assert 0 <= miou <= 100
    info = json.loads((tmp / "pre" / "encoder.json").read_text())
    assert info["pool_images"] == 4 and info["epochs"] == 1 and info["iterations"] == 2
    assert (tmp / "pre" / "encoder.pth").stat().st_size > 1000


def check_toy(out: str, tmp: Path) -> None:
    assert re.search(rf"^wrote 4 train \(2 labeled\) \+ 1 val images to .*toy in {NUM} s$", out, re.MULTILINE), out
    splits = tmp / "toy" / "splits"
    assert [len((splits / f).read_text().split()) for f in ("labeled.txt", "unlabeled.txt", "val.txt")] == [2, 2, 1]
    assert len(list((tmp / "toy" / "JPEGImages").iterdir())) == 5


def check_splits_make(out: str, tmp: Path) -> None:
    [(labeled, unlabeled)] = numbers(r"^labeled: (\d+), unlabeled: (\d+) -> ", out, 1)
    assert (labeled, unlabeled) == (3, 24 + 5 - 3)  # the toy_root fixture's 24 training and 5 val images
    assert len((tmp / "split" / "labeled.txt").read_text().split()) == 3
    assert len((tmp / "split" / "unlabeled.txt").read_text().split()) == 26


def check_help(out: str, tmp: Path) -> None:
    assert re.search(r"^usage: ", out, re.MULTILINE), out


@dataclass(frozen=True)
class Tool:
    """`args` and `env` may name {python}, {tmp} (the row's own folder) and {toy} (the tests' toy data)."""
    entry: str                      # benchmarks/x.py, benchmarks/x.sh, train_semi.py, or a module s4mc.x
    args: list[str]
    check: Callable[[str, Path], None]
    env: dict[str, str] = field(default_factory=dict)
    alone: bool = False             # a Python tool in an interpreter of its own, not the shared one
    covered_by: str | None = None   # the test that runs it in earnest (then args is --help)

    def command(self) -> list[str]:
        if self.entry.endswith(".sh"):
            return ["bash", self.entry, *self.args]
        if self.entry.endswith(".py"):
            return ["{python}", self.entry, *self.args]
        return ["{python}", "-m", self.entry, *self.args]

    @property
    def shared(self) -> bool:
        return not (self.alone or self.entry.endswith(".sh"))


Covered = partial(Tool, args=["--help"], check=check_help)

TOOLS = [
    # Its own process (the longest row): train_step.py four times and method.py, as a GPU session runs them.
    Tool("benchmarks/gpu_checks.sh", ["--dry-run"], check_gpu_checks, env={"OUT": "{tmp}/gpu_out", "PY": "{python}"}),
    # The shared interpreter, in this order: those run in earnest elsewhere first (they only parse --help) ...
    Covered("benchmarks/train_step.py", covered_by="the benchmarks/gpu_checks.sh row (four settings)"),
    Covered("benchmarks/variants.py", covered_by="tests/test_study.py::test_variants_script_end_to_end"),
    Covered("benchmarks/mask_oracle.py", covered_by="tests/test_study.py::test_mask_oracle_script_end_to_end"),
    Covered("benchmarks/toy_shift.py", covered_by="tests/test_study.py::test_shift_and_refinement_tools_on_a_tiny_run"),
    Covered("benchmarks/refine_effect.py",
            covered_by="tests/test_study.py::test_shift_and_refinement_tools_on_a_tiny_run"),
    Covered("train_semi.py",
            covered_by="tests/test_reliability.py::test_ctrl_c_from_a_terminal_with_loader_workers (a subprocess)"),
    Covered("eval.py", covered_by="tests/test_study.py::test_shift_and_refinement_tools_on_a_tiny_run "
                                  "(toy_shift.py runs it as a subprocess)"),
    Covered("s4mc.plots", covered_by="tests/test_study.py::test_run_writes_metrics_log_and_plots"),
    Covered("s4mc.data.priors",
            covered_by="tests/test_reliability.py::test_priors_cli_takes_the_neighbourhood_from_the_config"),
    Covered("s4mc.engine.run_header", covered_by="tests/test_run_header.py::test_preview_command_on_the_voc_config"),
    Covered("s4mc.data.coco", covered_by="tests/test_coco_ade20k.py::test_coco_id_table_round_trip_and_converter"),
    Covered("s4mc.study", covered_by="tests/test_study_tool.py::test_local_study_then_collect_marks_refuses_and_plots "
                                     "and tests/test_slurm.py"),
    # ... then the runs (loss_trace.py turns logging off and toy_pretrain trains: last).
    Tool("s4mc.data.toy", ["--root", "{tmp}/toy", "--num-train", "4", "--num-labeled", "2", "--num-val", "1",
                           "--size", "32"], check_toy),
    Tool("s4mc.data.splits", ["make", "--root", "{toy}", "--image-dir", "JPEGImages", "--mask-dir",
                              "SegmentationClass", "--num-labeled", "3", "--out", "{tmp}/split"], check_splits_make),
    Tool("benchmarks/data.py", ["--images", "2", "--runs", "1", "--crop", "64"], check_data),
    Tool("benchmarks/method.py", ["--size", "24", "--batch", "2", "--runs", "2", "--warmup", "1", "--device", "cpu",
                                  "--neighbors", "8", "--k", "2", "--profile", "{tmp}/profile.txt"], check_method),
    Tool("benchmarks/margin_variants.py", ["--dry-run"], check_margin_variants),
    Tool("benchmarks/checkpoint_size.py", ["--opts", *TINY_NET], check_checkpoint_size),
    Tool("benchmarks/loss_trace.py", ["--settings", "s4mc", "--iters", "2"], check_loss_trace),
    Tool("s4mc.toy_pretrain", ["--out-dir", "{tmp}/pre", "--pool-images", "4", "--epochs", "1", "--size", "32",
                               "--opts", "dataset.batch_size=2", "dataset.workers=0", "dataset.train.crop.size=[32,32]",
                               *TINY_NET], check_toy_pretrain),
]

# Runs the shared rows one after the other, each as `python path ARGS` / `python -m module ARGS` would
# (sys.argv, sys.path, __name__ == "__main__"; modules already imported stay), each output after a marker line.
SHARED_HARNESS = r"""
import json, os, runpy, sys, traceback
cwd, path = os.getcwd(), list(sys.path)
for entry, args in json.loads(sys.argv[1]):
    sys.argv = [entry, *args]
    sys.path[:] = path
    sys.path[0] = os.path.dirname(os.path.abspath(entry)) if entry.endswith(".py") else cwd
    print(f"\n=== {entry}", flush=True)
    try:
        if entry.endswith(".py"):
            runpy.run_path(entry, run_name="__main__")
        else:
            runpy.run_module(entry, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc(file=sys.stdout)
        code = "exception"
    print(f"\n=== exit {code}", flush=True)
"""


def fill(text: str, tmp: Path, toy: Path | None) -> str:
    for key, value in (("{python}", sys.executable), ("{tmp}", str(tmp)), ("{toy}", str(toy))):
        text = text.replace(key, value)
    return text


def run(cmd: list[str], env: dict[str, str], merge: bool = False) -> str:
    """The command's stdout (with its stderr if `merge`); a clear failure if it exits non-zero."""
    environ = dict(os.environ, OMP_NUM_THREADS="1", **env)
    environ.pop("PYTHONPATH", None)  # the scripts must find the package themselves, as from a shell
    proc = subprocess.run(cmd, cwd=REPO, env=environ, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT if merge else subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def run_shared(rows: list[tuple[Tool, Path]], toy: Path | None) -> dict[str, str]:
    """Each shared row's output, from one interpreter; a row that exits non-zero fails only its own test."""
    spec = [(tool.entry, [fill(a, tmp, toy) for a in tool.args]) for tool, tmp in rows]
    # stderr merged (and unbuffered), so that a row's error message shows in its own test's failure
    out = run([sys.executable, "-u", "-c", SHARED_HARNESS, json.dumps(spec)], {}, merge=True)
    parts = re.split(r"^=== (\S+)\n", out, flags=re.MULTILINE)[1:]
    outputs = dict(zip(parts[::2], parts[1::2]))
    assert list(outputs) == [tool.entry for tool, _ in rows], out
    return outputs


@pytest.fixture(scope="module")
def launched(request, tmp_path_factory):
    """A future of each selected row's output, and its folder. The shell script, the shared interpreter and
    any `alone` row run side by side on a pool as wide as the machine (at most 4): on 2 cores, the shared
    interpreter's rows take no longer than gpu_checks.sh's dry run alone."""
    names = {item.nodeid.split("::")[-1] for item in request.session.items
             if item.nodeid.startswith(f"{request.node.nodeid}::")}
    selected = [(t, tmp_path_factory.mktemp(re.sub(r"\W", "_", t.entry))) for t in TOOLS
                if f"test_tool_runs[{t.entry}]" in names]
    toy = request.getfixturevalue("toy_root") if any("{toy}" in a for t, _ in selected for a in t.args) else None
    width = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    started = {}
    with ThreadPoolExecutor(max_workers=width) as pool:
        for tool, tmp in selected:
            if not tool.shared:
                cmd = [fill(c, tmp, toy) for c in tool.command()]
                started[tool.entry] = (pool.submit(run, cmd, {k: fill(v, tmp, toy) for k, v in tool.env.items()}), tmp)
        shared = [(tool, tmp) for tool, tmp in selected if tool.shared]
        if shared:
            together = pool.submit(run_shared, shared, toy)
            for tool, tmp in shared:
                started[tool.entry] = (together, tmp)
        yield started
        for future, _ in started.values():
            future.cancel()


@pytest.mark.parametrize("tool", TOOLS, ids=[t.entry for t in TOOLS])
def test_tool_runs(tool, launched):
    future, tmp = launched[tool.entry]
    out = future.result()
    if tool.shared:
        out, code = re.fullmatch(r"(.*?)\n*=== exit (.*?)\s*", out[tool.entry], re.DOTALL).groups()
        assert code == "0", f"{tool.entry} {' '.join(tool.args)} exited {code}:\n{out}"
    tool.check(out, tmp)


def entry_points() -> set[str]:
    """Every script in benchmarks/, the two top-level scripts, and every s4mc module with a __main__ block."""
    found = {f"benchmarks/{p.name}" for p in (REPO / "benchmarks").iterdir() if p.suffix in (".py", ".sh")}
    found |= {"train_semi.py", "eval.py"}
    for path in (REPO / "s4mc").rglob("*.py"):
        if re.search(r"^if __name__ == .__main__.:", path.read_text(), re.MULTILINE):
            found.add(".".join(path.relative_to(REPO).with_suffix("").parts))
    return found


def test_every_entry_point_has_a_row():
    rows = [t.entry for t in TOOLS]
    assert len(rows) == len(set(rows))
    assert entry_points() == set(rows), "add a row to TOOLS for each new or renamed tool"
    assert all(t.covered_by is None or t.args == ["--help"] for t in TOOLS)


def test_toy_pretrain_keeps_off_recipe_encoders_out_of_the_default_folder(capsys):
    from s4mc import toy_pretrain

    with pytest.raises(SystemExit) as stop:  # refused before anything is generated or trained
        toy_pretrain.main(["--epochs", "1"])
    assert stop.value.code == 2 and "give --out-dir other than" in capsys.readouterr().err
