"""python -m s4mc.study (issue 32): the study file, run names, the launchers' commands, `collect`'s
table and its refusals, the Slurm step's process-group variables, and the toy study's study.json
rebuilt byte for byte by benchmarks/variants.py --from-runs."""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import json
import statistics
from pathlib import Path

import pytest

from s4mc import distributed, study
from s4mc.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TOY_STUDY = REPO / "experiments" / "toy" / "study.yaml"


def _variants():
    spec = importlib.util.spec_from_file_location("variants", REPO / "benchmarks" / "variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _values_rounding_to(shown: list[float], mean: float, std: float | None) -> list[float]:
    """Per-seed values that round to `shown` (2 decimals) and whose mean (and std) round to the
    summary's: the unrounded numbers the shipped study was computed from are not shipped."""
    steps = [k / 1000 for k in range(-4, 5)]
    for offsets in itertools.product(steps, repeat=len(shown)):
        values = [x + d for x, d in zip(shown, offsets)]
        if round(statistics.fmean(values), 2) != mean:
            continue
        if std is not None and round(statistics.stdev(values) if len(values) > 1 else 0.0, 2) != std:
            continue
        return values
    raise AssertionError(f"no values round to {shown} with mean {mean} and std {std}")


def test_the_shipped_toy_study_json_is_rebuilt_byte_for_byte(tmp_path):
    """experiments/toy/study.json is what `variants.py --from-runs` writes from the study's runs,
    whose rows now come from experiments/toy/study.yaml: runs carrying the shipped numbers give
    back the shipped file, byte for byte."""
    shipped = (REPO / "experiments" / "toy" / "study.json").read_text()
    saved = json.loads(shipped)
    variants = _variants()
    assert list(saved["variants"]) == variants.DEFAULT_VARIANTS  # the study file's rows, in order
    for row, r in saved["variants"].items():
        miou = _values_rounding_to(r["miou"], r["mean"], r["std"])
        diagnostics = {}
        for short, key in variants.DIAGNOSTICS.items():
            if short in r:
                diagnostics[key] = [v / 100 for v in _values_rounding_to(r[short + "_per_seed"], r[short], None)]
        for i, seed in enumerate(saved["seeds"]):
            run = tmp_path / "runs" / f"{row}_seed{seed}"
            run.mkdir(parents=True)
            (run / "metrics.jsonl").write_text("")
            (run / "results.json").write_text(json.dumps({
                "final": {"miou": miou[i] / 100}, "best_miou": r["best"][i] / 100, "iterations": r["iterations"][i],
                "seconds": r["seconds"][i], "diagnostics": {k: v[i] for k, v in diagnostics.items()}}))
    out = tmp_path / "study.json"
    assert variants.main(["--seeds", *map(str, saved["seeds"]), "--from-runs", str(tmp_path / "runs"),
                          "--json", str(out)]) == 0
    assert out.read_text() == shipped


def _write_study(tmp_path: Path, config: Path, **extra) -> Path:
    import yaml

    data = {"name": "mini", "configs": {"tiny": str(config)}, "rows": {"supervised": ["trainer.mode=sup"], "s4mc": []},
            "seeds": [0, 1], "output_dir": str(tmp_path / "runs"), **extra}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _tiny_config(toy_root: Path, tmp_path: Path) -> Path:
    from conftest import make_toy_cfg

    from s4mc.config import dump_config

    cfg = make_toy_cfg(toy_root, tmp_path / "runs", **{"trainer.max_iters": 2, "trainer.epochs": 1})
    path = tmp_path / "tiny.yaml"
    dump_config(cfg, path)
    return path


def test_study_file_errors_name_the_file_and_key(tmp_path, toy_root):
    config = _tiny_config(toy_root, tmp_path)
    cases = [({"rows": {"s4mc": ["trainer.epochs"]}}, "rows.s4mc holds 'trainer.epochs', which is not KEY=VALUE"),
             ({"configs": {"tiny": "nowhere.yaml"}}, "configs.tiny names nowhere.yaml, which is not a file"),
             ({"seeds": [0, "one"]}, "seeds must be a list of integers"),
             ({"slurm": {"gpus": 8}}, "slurm.gpus is not a Slurm setting"),
             ({"rowz": {}}, "rowz is not a study key"),
             ({"name": "a/b"}, "name must be a folder name")]
    for extra, message in cases:
        path = _write_study(tmp_path, config, **extra)
        with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
            study.load_study(path)
    good = study.load_study(_write_study(tmp_path, config, rows={"s4mc": ["x=${trainer.nope}"]}))
    with pytest.raises(ConfigError, match=r"row s4mc: \$\{trainer.nope\} names no key"):
        study.expand(good)
    with pytest.raises(ConfigError, match="no row 'cutmix'"):
        study.expand(good, rows=["cutmix"])
    assert study.main(["run", str(tmp_path / "missing.yaml")]) == 2


def test_run_names_substitution_and_the_printed_commands(tmp_path, toy_root, capsys):
    toy = study.load_study(TOY_STUDY)
    runs = study.expand(toy, rows=["supervised_all", "s4mc"], seeds=[2])
    assert [r.name for r in runs] == ["toy/toy/supervised_all/seed2", "toy/toy/s4mc/seed2"]
    assert all(r.run_dir == toy.output_dir / r.name for r in runs)
    switches = runs[0].opts
    assert f"dataset.train.data_list={REPO / 'data' / 'toy' / 'splits' / 'train_all.txt'}" in switches
    assert switches[:1] == ["trainer.image_every=0"] and f"output_dir={toy.output_dir}" in switches
    pascal = study.load_study(REPO / "experiments" / "pascal" / "study.yaml")
    runs = study.expand(pascal)
    assert len(runs) == 5 * 3 * 3 and runs[0].name == "pascal/92/supervised/seed0"
    # the baselines clear the config's published number (the S4MC row's), the S4MC row keeps it
    assert [study._published(r) for r in runs if r.config_name == "366" and r.seed == 0] == [None, None, 75.41]
    config = _tiny_config(toy_root, tmp_path)
    path = _write_study(tmp_path, config, slurm={"gpus_per_node": 4})
    assert study.main(["run", str(path), "--launcher", "print", "--seeds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith("torchrun --nproc_per_node=4 train_semi.py --config ") for line in lines)
    assert "--seed 1 --name mini/tiny/supervised/seed1 --resume auto --opts" in lines[0]
    assert lines[0].endswith("trainer.mode=sup")


def test_local_study_then_collect_marks_refuses_and_plots(tmp_path, toy_root, capsys):
    config = _tiny_config(toy_root, tmp_path)
    path = _write_study(tmp_path, config, opts=["recipe.published_miou=40"])
    assert study.main(["run", str(path), "--seeds", "0", "1"]) == 0
    runs = tmp_path / "runs" / "mini" / "tiny"
    miou = {(r, s): 100 * json.loads((runs / r / f"seed{s}" / "results.json").read_text())["final"]["miou"]
            for r in ("supervised", "s4mc") for s in (0, 1)}
    capsys.readouterr()
    assert study.main(["run", str(path)]) == 0  # everything finished: nothing trains again
    assert "4 of 4 run(s) already finished" in capsys.readouterr().out
    # seed 1 of s4mc: unfinished (no results.json); seed 1 of supervised: missing
    (runs / "s4mc" / "seed1" / "results.json").unlink()
    import shutil

    shutil.rmtree(runs / "supervised" / "seed1")
    assert study.main(["collect", str(path), "--plot", str(tmp_path / "t.png")]) == 0
    table = json.loads((tmp_path / "runs" / "mini" / "table.json").read_text())
    cells = {c["row"]: c for c in table["cells"]}
    assert cells["s4mc"]["n"] == 1 and cells["s4mc"]["mean"] == round(miou[("s4mc", 0)], 2)
    assert cells["s4mc"]["seeds"]["1"] == {"status": "unfinished", "iteration": 2, "of": 2}
    assert cells["supervised"]["seeds"]["1"] == {"status": "missing"}
    assert cells["supervised"]["difference"] == round(miou[("supervised", 0)] - 40, 2)
    text = (tmp_path / "runs" / "mini" / "table.md").read_text()
    assert text.splitlines()[2] == "| row | tiny | tiny paper (Δ) |"
    assert "missing: seed 1" in text and "unfinished: seed 1 (2/2)" in text and "(n=1)" in text
    assert (tmp_path / "t.png").stat().st_size > 5_000
    # a run of another protocol (here: another global batch) is not averaged with the others
    shutil.rmtree(runs / "s4mc" / "seed1")
    assert study.main(["run", str(path), "--rows", "s4mc", "--seeds", "1", "--opts", "dataset.batch_size=4"]) == 0
    capsys.readouterr()
    assert study.main(["collect", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"refusing to average s4mc on tiny: seed 0 and seed 1 ran different protocols, global batch "
                     r"\{\"labeled\": 2, \"unlabeled\": 2\} vs \{\"labeled\": 4, \"unlabeled\": 4\}", err), err
    cell = {c["row"]: c for c in json.loads((tmp_path / "runs" / "mini" / "table.json").read_text())["cells"]}["s4mc"]
    assert cell["mean"] is None and cell["refused"]


def test_a_slurm_step_becomes_torch_launcher_variables(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLURM_") or key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(key)
    assert distributed.slurm_step() is None and distributed.launcher_ranks() == (0, 1)
    # an sbatch script's own shell: the job's task count, but no step, so one process
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    assert distributed.slurm_step() is None
    # task 3 of a 4-task step on two nodes; no scontrol here: the launch node's address
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("SLURM_STEP_ID", "1")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[07-08]")
    monkeypatch.setenv("SLURM_LAUNCH_NODE_IPADDR", "10.0.0.7")
    step = distributed.slurm_step()
    assert step == {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.7",
                    "MASTER_PORT": str(20000 + (16 * 1234 + 1) % 40000)}
    assert distributed.launcher_ranks() == (3, 4)
    monkeypatch.setenv("MASTER_PORT", "29555")  # a port the user chose wins
    assert distributed.slurm_step()["MASTER_PORT"] == "29555"
    monkeypatch.setenv("WORLD_SIZE", "8")  # srun torchrun …: torchrun's variables win
    monkeypatch.setenv("RANK", "5")
    assert distributed.launcher_ranks() == (5, 8)
