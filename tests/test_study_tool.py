"""python -m s4mc.study (issue 32): the study file, run names, the launchers' commands, `collect`'s
table and its refusals, the Slurm step's process-group variables, and the toy study's study.json
rebuilt byte for byte by benchmarks/variants.py --from-runs."""

from __future__ import annotations

import importlib.util
import itertools
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
