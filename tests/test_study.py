"""The toy study's pieces: the pretraining pool and encoder, the supervised row's budget, the
metrics log every run writes, `python -m s4mc.plots`, and benchmarks/variants.py end to end."""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from s4mc.data import build_train_loaders
from s4mc.data.toy import PRETRAIN, TARGET, generate_toy, render_scene
from s4mc.engine import loop
from s4mc.errors import S4MCError

REPO = Path(__file__).resolve().parents[1]


def _benchmark(name: str):
    """Import benchmarks/<name>.py (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _variants_module():
    return _benchmark("variants")


def test_pretraining_pool_has_other_shapes_and_another_colour_code():
    assert not set(PRETRAIN.shapes) & set(TARGET.shapes)
    # colour says less about the pool's classes, and through another mapping than the target's
    assert PRETRAIN.class_pref < TARGET.class_pref and PRETRAIN.palette_shift % 5 and PRETRAIN.palette_shift % 6
    for style in (TARGET, PRETRAIN):
        labels = np.concatenate([render_scene(np.random.default_rng([7, i]), 64, style)[1].ravel()
                                 for i in range(12)])
        assert labels.max() <= len(style.shapes) and set(np.unique(labels)) >= {0, 1, 2, 3, 4, 5}
    # same seed, other style: other scenes
    a = render_scene(np.random.default_rng(3), 64, TARGET)[1]
    b = render_scene(np.random.default_rng(3), 64, PRETRAIN)[1]
    assert not np.array_equal(a, b)


def test_generator_writes_all_labels_list(tmp_path):
    root = generate_toy(tmp_path / "t", seed=1, num_train=6, num_labeled=2, num_val=1, size=32)
    lines = (root / "splits" / "train_all.txt").read_text().split()
    assert len(lines) == 6
    assert set(lines) == set((root / "splits" / "labeled.txt").read_text().split()) | set(
        (root / "splits" / "unlabeled.txt").read_text().split())


def test_supervised_row_gets_the_semi_budget(toy_root, toy_cfg, tmp_path):
    semi = build_train_loaders(toy_cfg(toy_root, tmp_path), seed=0)
    plain = build_train_loaders(toy_cfg(toy_root, tmp_path, **{"trainer.mode": "sup"}), seed=0, labeled_only=True)
    fair = build_train_loaders(toy_cfg(toy_root, tmp_path, **{"trainer.mode": "sup",
                                                               "trainer.sup_epoch_length": "unlabeled"}),
                               seed=0, labeled_only=True)
    assert len(plain.labeled) < len(semi.unlabeled)
    assert len(fair.labeled) == len(semi.labeled) == len(semi.unlabeled)
    # the very batches the semi run's labeled stream draws
    assert torch.equal(next(iter(fair.labeled))["image"], next(iter(semi.labeled))["image"])


def test_run_writes_metrics_log_and_plots(toy_root, toy_cfg, tmp_path):
    from s4mc import plots

    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.epochs": 2, "trainer.log_every": 2})
    loop.train(cfg, name="a")
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert train and val and all("kept_fraction" in r and "kept_accuracy_unrefined" in r for r in train)
    assert [r["iteration"] for r in train] == sorted(r["iteration"] for r in train)
    semi = [r for r in train if "kept_accuracy_same_share" in r]  # the refinement's bar, once pseudo-labels start
    assert semi and all(0 <= r["kept_accuracy_same_share"] <= 1 for r in semi)
    assert "same share" in (tmp_path / "a" / "train.log").read_text()
    # the refinement's reach: the pixels it added and dropped, as a share of the valid ones
    assert all((r["flipped_fraction"] > 0) == (r["flipped_to_keep"] + r["flipped_to_drop"] > 0) for r in semi)
    assert all(0 <= r["flipped_fraction"] <= 1 for r in semi)
    assert re.search(r"refine \+\d+/-\d+ px \(\d+\.\d%\)", (tmp_path / "a" / "train.log").read_text())
    fig, (ax_kept, ax_acc) = plots.pyplot().subplots(1, 2)
    plots.draw_quantity_quality(ax_kept, ax_acc, {"a": train})
    assert "a same share" in [line.get_label() for line in ax_acc.lines]
    assert "a same share" not in [line.get_label() for line in ax_kept.lines]
    plots.pyplot().close(fig)
    assert val[-1]["miou"] == pytest.approx(json.loads((tmp_path / "a" / "results.json").read_text())["final"]["miou"])
    sup = toy_cfg(toy_root, tmp_path, **{"trainer.epochs": 2, "trainer.mode": "sup"})
    loop.train(sup, name="b")
    out = tmp_path / "cmp.png"
    assert plots.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    from PIL import Image

    width, height = Image.open(out).size
    assert width > 2 * height > 0  # three panels side by side
    with pytest.raises(S4MCError, match="no metrics log"):
        plots.load_run(tmp_path / "missing")


def test_metrics_log_drops_lines_past_a_resume(tmp_path):
    from s4mc.logs import MetricsLog

    log = MetricsLog(tmp_path / "m.jsonl")
    for it in (10, 20, 30):
        log.write("train", it, 0, {"loss": 1.0})
    MetricsLog(tmp_path / "m.jsonl", resume_iteration=20).write("train", 30, 0, {"loss": 2.0})
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["loss"]) for r in lines] == [(10, 1.0), (20, 1.0), (30, 2.0)]


def test_plots_without_matplotlib_says_so(monkeypatch):
    import builtins

    from s4mc import plots

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(S4MCError, match="pip install matplotlib"):
        plots.pyplot()


def test_pretrained_encoder_loads_strictly_into_the_toy_model(tmp_path, toy_cfg, toy_root, monkeypatch):
    from s4mc import toy_pretrain
    from s4mc.models import build_model, weights

    tiny = ["dataset.train.crop.size=[40,40]", "dataset.workers=0", "net.encoder.kwargs.width=8",
            "net.decoder.kwargs.inner_planes=16", "net.decoder.kwargs.low_conv_planes=16", "trainer.eval_on=false"]
    path = toy_pretrain.pretrain_encoder(tmp_path / "pre", pool_images=16, epochs=1, size=48, extra=tiny)
    assert path.is_file() and json.loads((tmp_path / "pre" / "encoder.json").read_text())["iterations"] == 2
    monkeypatch.setattr(weights, "TOY_ENCODER_FILE", path)  # where `net.encoder.pretrained: toy` looks
    cfg = toy_cfg(toy_root, tmp_path, **{"net.encoder.pretrained": "toy"})
    model = build_model(cfg["net"])
    saved = torch.load(path, weights_only=True)
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in saved.items())
    monkeypatch.setattr(weights, "TOY_ENCODER_FILE", tmp_path / "nowhere" / "encoder.pth")
    with pytest.raises(S4MCError, match="python -m s4mc.toy_pretrain"):
        build_model(cfg["net"])


def test_study_checks_follow_the_issue():
    variants = _variants_module()
    rows = {"supervised": {"mean": 55.0, "std": 0.5}, "supervised_all": {"mean": 78.0, "std": 0.4},
            "cutmix_seg": {"mean": 60.0, "std": 0.6, "kept": 80.0, "kept_accuracy": 90.0},
            "s4mc": {"mean": 63.0, "std": 0.7, "kept": 84.0, "kept_accuracy": 90.5}}
    assert all(ok for _, ok in variants.check_ordering(rows))
    rows["s4mc"]["mean"] = 60.5  # ahead of cutmix_seg by less than the seed noise, and < 1/3 of the gap
    failed = [text for text, ok in variants.check_ordering(rows) if not ok]
    assert len(failed) == 2 and any("s4mc > cutmix_seg" in t for t in failed)
    assert variants.mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert variants.mean_std([4.0]) == (4.0, 0.0)


def test_paired_gaps_compare_rows_seed_by_seed():
    variants = _variants_module()
    rows = {"supervised": {"miou": [60.0, 58.0, 62.0]}, "cutmix_seg": {"miou": [66.0, 63.0, 69.0]},
            "s4mc": {"miou": [66.5, 62.5, 69.5]}}
    gaps = variants.paired_gaps(rows)
    assert list(gaps) == ["cutmix_seg - supervised", "s4mc - cutmix_seg"]
    assert gaps["cutmix_seg - supervised"]["per_seed"] == [6.0, 5.0, 7.0]
    assert gaps["cutmix_seg - supervised"]["mean"] == 6.0 and gaps["cutmix_seg - supervised"]["std"] == 1.0
    # the seeds' shared ups and downs cancel: a 0.17 mean gap with a 0.58 spread, not the rows' 3.0
    assert gaps["s4mc - cutmix_seg"]["mean"] == pytest.approx(0.17, abs=0.01)
    assert gaps["s4mc - cutmix_seg"]["std"] == pytest.approx(0.58, abs=0.01)
    del rows["cutmix_seg"]
    assert list(variants.paired_gaps(rows)) == ["s4mc - supervised"]


def test_toy_style_with_colour_variants_of_each_shape():
    style = replace(TARGET, num_classes=16, pools=16)
    labels = np.concatenate([render_scene(np.random.default_rng([5, i]), 64, style)[1].ravel() for i in range(40)])
    assert labels.max() <= 15 and len(np.unique(labels)) >= 12
    # the default style's scenes do not change: one class per shape
    assert render_scene(np.random.default_rng(3), 64, TARGET)[1].max() <= 5
    with pytest.raises(ValueError, match="num_classes=9"):
        replace(TARGET, num_classes=9)


def _tiny_study_config(toy_root, tmp_path) -> Path:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(json.dumps({
        "dataset": {"type": "toy", "batch_size": 2, "workers": 0,
                    "train": {"data_root": str(toy_root), "data_list": str(toy_root / "splits/labeled.txt"),
                              "rand_resize": [0.75, 1.25], "crop": {"type": "rand", "size": [40, 40]}},
                    "val": {"data_root": str(toy_root), "data_list": str(toy_root / "splits/val.txt")}},
        "trainer": {"epochs": 1, "sup_only_epoch": 0, "log_every": 2, "max_iters": 4,
                    "unsupervised": {"neighborhood_size": 8, "neighbor_prior": "none"}},
        "net": {"num_classes": 6, "sync_bn": False, "encoder": {"type": "resnet_tiny", "kwargs": {"width": 8}},
                "decoder": {"kwargs": {"inner_planes": 16, "low_conv_planes": 16, "dilations": [2, 4, 6]}}}}))
    return cfg


def test_variants_script_end_to_end(toy_root, tmp_path):
    variants = _variants_module()
    cfg = _tiny_study_config(toy_root, tmp_path)
    out = tmp_path / "study.json"
    rc = variants.main(["--config", str(cfg), "--seeds", "0", "1", "--variants", "supervised", "supervised_all",
                        "s4mc", "--out", str(tmp_path / "runs"), "--json", str(out), "--plot", str(tmp_path / "s.png")])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["seeds"] == [0, 1] and set(result["variants"]) == {"supervised", "supervised_all", "s4mc"}
    s4mc = result["variants"]["s4mc"]
    assert len(s4mc["miou"]) == 2 and s4mc["mean"] == pytest.approx(sum(s4mc["miou"]) / 2, abs=0.01)
    assert 0 < s4mc["kept"] <= 100 and "kept_accuracy" in s4mc and "kept_unrefined" in s4mc
    assert 0 <= s4mc["flipped"] <= 100 and len(s4mc["flipped_per_seed"]) == 2
    assert result["variants"]["supervised"]["iterations"] == s4mc["iterations"] == [4, 4]
    paired = result["paired"]["s4mc - supervised"]
    assert paired["per_seed"] == [round(m - s, 2) for m, s in zip(s4mc["miou"], result["variants"]["supervised"]["miou"])]
    assert (tmp_path / "s.png").stat().st_size > 10_000
    # one seed per process, then a summary of the same runs: the same rows
    again = tmp_path / "again.json"
    assert variants.main(["--config", str(cfg), "--seeds", "0", "1", "--variants", "supervised", "supervised_all",
                          "s4mc", "--from-runs", str(tmp_path / "runs"), "--json", str(again)]) == 0
    assert json.loads(again.read_text())["variants"] == result["variants"]


def test_comparison_line_reads_the_study(tmp_path, toy_root, toy_cfg):
    from s4mc.logs import comparison_line, study_row

    study = tmp_path / "study.json"
    study.write_text(json.dumps({"seeds": [0, 1, 2], "variants": {
        "supervised": {"mean": 57.08, "std": 1.47}, "s4mc": {"mean": 66.5, "std": 0.5}}}))
    line = comparison_line(study, 0.6612, "s4mc")
    assert "this run (S4MC) 66.12" in line and "supervised only 57.08 ± 1.47" in line
    assert "S4MC 66.50 ± 0.50" in line and "+9.04 over supervised only" in line and "seeds 0 1 2" in line
    assert "cannot read the study" in comparison_line(tmp_path / "missing.json", 0.5, "s4mc")
    rows = {"supervised": {"trainer.mode": "sup"}, "cutmix_seg": {"trainer.unsupervised.refine": False},
            "s4mc_psi": {"trainer.unsupervised.strong_aug": True}, "s4mc": {},
            "unimatch": {"trainer.method": "unimatch", "trainer.unsupervised.refine": False},
            "s4mc_unimatch": {"trainer.method": "unimatch"}}
    for row, overrides in rows.items():
        assert study_row(toy_cfg(toy_root, tmp_path, **overrides)) == row


def test_toy_config_compares_with_the_shipped_study():
    from s4mc.config import load_config

    cfg = load_config(REPO / "experiments" / "toy" / "config.yaml")
    study = json.loads(Path(cfg["evaluation"]["compare_with"]).read_text())
    assert set(study["variants"]) >= {"supervised", "supervised_all", "cutmix_seg", "s4mc"}
    assert all(len(row["miou"]) == len(study["seeds"]) for row in study["variants"].values())
    assert cfg["net"]["encoder"]["pretrained"] == "toy" and (REPO / "data" / "toy_pretrain" / "encoder.pth").is_file()


def test_shift_and_refinement_tools_on_a_tiny_run(toy_root, toy_cfg, tmp_path, capsys):
    loop.train(toy_cfg(toy_root, tmp_path, **{"trainer.epochs": 1, "trainer.mode": "sup"}), name="r")
    run = tmp_path / "r"
    assert _benchmark("toy_shift").main([str(run), "--data-root", str(toy_root), "--json", str(tmp_path / "s.json")]) == 0
    shift = json.loads((tmp_path / "s.json").read_text())["r"]
    assert set(shift) == {"unlabeled_pool", "val", "val_clean"}
    assert all(0 <= v["miou"] <= 100 and 0 <= v["pixel_acc"] <= 100 for v in shift.values())
    capsys.readouterr()
    assert _benchmark("refine_effect").main([str(run), "--images", "3", "--keep", "60", "80"]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith(("margin", "confidence"))]
    flips = [line for line in out if line.startswith("flips ")]
    assert len(lines) == len(flips) == 2 * 2 * 2
    for line, where in zip(lines, flips):
        # the second table describes the pixels the first one counts: same setting, same in / out per 1k
        setting, added, dropped, everything = (part.split() for part in where.split("|"))
        assert setting[1:] == line.split("|")[0].split()
        in_out = line.split("|")[3].split()
        assert float(added[0]) == float(in_out[0]) and float(dropped[0]) == float(in_out[2])
        assert float(everything[0]) == 1000.0
        assert all(0 <= float(v) <= 100 for v in added[1:] + dropped[1:] + everything[1:])
    for line in lines:
        setting, kept, acc, flips, same = (part.split() for part in line.split("|"))
        kept_raw, kept = float(kept[0]), float(kept[2])
        assert kept_raw == pytest.approx(float(setting[3]), abs=0.5)  # gamma is the unrefined percentile
        if setting[0] == "confidence":
            # refinement can only raise the top class's probability, so nothing is dropped
            assert kept >= kept_raw and float(flips[-1]) == 0.0
        # the refined accuracy's lead over the threshold moved to the same share
        assert 0 <= float(same[0]) <= 100
        assert float(same[1].strip("()")) == pytest.approx(float(acc[2]) - float(same[0]), abs=0.02)


def test_a_run_cut_short_is_not_compared_with_the_study(toy_root, toy_cfg, tmp_path):
    study = tmp_path / "study.json"
    study.write_text(json.dumps({"seeds": [0], "variants": {"supervised": {"mean": 50.0, "std": 0.0, "miou": [50.0]},
                                                            "s4mc": {"mean": 60.0, "std": 0.0, "miou": [60.0]}}}))
    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.max_iters": 2, "evaluation.compare_with": str(study)})
    loop.train(cfg, name="short")
    text = (tmp_path / "short" / "train.log").read_text()
    assert "no comparison with" in text and "stopped at 2 of the schedule's" in text
    assert "over supervised only" not in text


def test_a_run_with_another_budget_is_not_compared_with_the_study(toy_root, toy_cfg, tmp_path):
    """A whole schedule, but not the study's (its rows ran 600 iterations): no "same budget" line."""
    from s4mc.logs import comparison_line

    study = tmp_path / "study.json"
    rows = {name: {"mean": m, "std": 0.0, "miou": [m], "iterations": [600]} for name, m in (("supervised", 50.0),
                                                                                             ("s4mc", 60.0))}
    study.write_text(json.dumps({"seeds": [0], "variants": rows}))
    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.epochs": 1, "evaluation.compare_with": str(study)})
    loop.train(cfg, name="short")
    text = (tmp_path / "short" / "train.log").read_text()
    assert "same budget and starting point" not in text
    assert "no comparison with study.json: this run trained 8 iterations, the study's rows 600" in text
    assert "over supervised only" in comparison_line(study, 0.61, "s4mc", iterations=600)


def test_mask_oracle_keeps_what_it_says():
    oracle = _benchmark("mask_oracle")
    keep = torch.tensor([True, True, False, False, True, False])
    keep_unrefined = torch.tensor([True, False, True, False, False, True])
    right = torch.tensor([False, True, False, True, False, True])
    # kept by both: kept whatever the truth; flipped either way: kept exactly when right; neither: dropped
    assert oracle.oracle_keep(keep, keep_unrefined, right, "flips").tolist() == [True, True, False, False, False, True]
    assert oracle.oracle_keep(keep, keep_unrefined, right, "mask").tolist() == right.tolist()

    from s4mc import pseudo_label

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 12, 12) * 3
    pseudo = logits.argmax(1)
    truth = torch.where(torch.rand(2, 12, 12) < 0.7, pseudo, torch.randint(0, 4, (2, 12, 12)))
    truth[0, :2] = 255
    refined, _ = pseudo_label.pseudo_label_target(logits, pseudo, 60, neighbors=8, refine=True)
    unrefined, _ = pseudo_label.pseudo_label_target(logits, pseudo, 60, neighbors=8, refine=False)
    both, either = (refined != 255) & (unrefined != 255), (refined != 255) | (unrefined != 255)
    assert (both != either).any()  # the case has flipped pixels to decide
    original = pseudo_label.pseudo_label_target
    with oracle.oracle("flips"):
        target, stats = pseudo_label.pseudo_label_target(logits, pseudo, 60, neighbors=8, ground_truth=truth)
        kept = target != 255
        assert (kept[both]).all() and not kept[~either].any()
        flipped = both != either
        assert torch.equal(kept[flipped], (pseudo == truth)[flipped])
        assert float(stats["kept_fraction"]) == pytest.approx(kept.float().mean().item())
        # the loss (step 8) goes through the oracle too
        loss, loss_target, _ = pseudo_label.pseudo_label_loss(torch.zeros_like(logits), logits, pseudo, 60, neighbors=8,
                                                         ground_truth=truth)
        assert torch.equal(loss_target, target)
    assert pseudo_label.pseudo_label_target is original
    with oracle.oracle("mask"):
        target, stats = pseudo_label.pseudo_label_target(logits, pseudo, 60, neighbors=8, ground_truth=truth)
        assert torch.equal(target != 255, pseudo == truth) and float(stats["kept_accuracy"]) == 1.0
        with pytest.raises(S4MCError, match="ground truth"):
            pseudo_label.pseudo_label_target(logits, pseudo, 60)
    assert pseudo_label.pseudo_label_target is original


def test_moved_threshold_keeps_the_refined_count_by_the_unrefined_ranking():
    oracle = _benchmark("mask_oracle")
    from s4mc import pseudo_label

    raw = torch.tensor([[0.9, 0.1, 0.5], [0.5, 0.7, 0.3]])
    valid = torch.tensor([[True, True, True], [True, False, True]])
    # the two 0.5s tie: the first by position is kept
    assert oracle.moved_threshold_keep(raw, valid, torch.tensor(2)).tolist() == [[True, False, True],
                                                                                  [False, False, False]]
    assert oracle.moved_threshold_keep(raw, valid, torch.tensor(2), low_is_reliable=True).tolist() == [
        [False, True, False], [False, False, True]]
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 10, 10) * 2
    pseudo = logits.argmax(1)
    pseudo[1, 0] = 255
    for indicator in ("margin", "entropy"):
        refined, _ = pseudo_label.pseudo_label_target(logits, pseudo, 70, indicator=indicator, neighbors=8)
        with oracle.oracle("moved"):  # reads no ground truth
            target, stats = pseudo_label.pseudo_label_target(logits, pseudo, 70, indicator=indicator, neighbors=8)
        kept, valid = target != 255, pseudo != 255
        assert int(kept.sum()) == int((refined != 255).sum()) and not (kept & ~valid).any()
        raw = pseudo_label.indicator_map(torch.softmax(logits, 1), indicator)
        if indicator == "entropy":
            raw = -raw
        assert raw[kept].min() >= raw[valid & ~kept].max()
        assert torch.equal(target[kept], pseudo[kept])


def test_mask_oracle_script_end_to_end(toy_root, tmp_path, capsys):
    oracle, variants = _benchmark("mask_oracle"), _variants_module()
    cfg, runs = _tiny_study_config(toy_root, tmp_path), tmp_path / "runs"
    assert variants.main(["--config", str(cfg), "--seeds", "0", "--variants", "cutmix_seg", "s4mc", "--out", str(runs)]) == 0
    assert oracle.main(["--config", str(cfg), "--oracles", "mask", "moved", "--seeds", "0", "--out", str(runs)]) == 0
    assert "upper bound" in (runs / "oracle_mask_seed0" / "ORACLE.txt").read_text()
    capsys.readouterr()
    out = tmp_path / "oracle.json"
    assert oracle.main(["--from-runs", str(runs), "--seeds", "0", "--json", str(out)]) == 0
    assert "oracle_mask" in capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = result["variants"]
    assert set(rows) == {"cutmix_seg", "s4mc", "oracle_mask", "moved_threshold"}
    row, base = rows["oracle_mask"], rows["cutmix_seg"]
    assert row["kept_accuracy"] == 100.0 and base["kept_accuracy"] < 100.0
    assert result["minus_cutmix_seg"]["oracle_mask"]["per_seed"] == [round(row["miou"][0] - base["miou"][0], 2)]
    assert result["s4mc_minus_moved_threshold"]["per_seed"] == [
        round(rows["s4mc"]["miou"][0] - rows["moved_threshold"]["miou"][0], 2)]
    assert "no ground truth" in (runs / "moved_threshold_seed0" / "ORACLE.txt").read_text()
    assert oracle.main(["--from-runs", str(tmp_path / "none"), "--seeds", "0"]) == 2


def test_refine_effect_near_edge_on_a_known_map():
    near_edge = _benchmark("refine_effect").near_edge
    labels = torch.zeros(1, 5, 9, dtype=torch.long)
    labels[..., 4:] = 1  # a class change between columns 3 and 4
    assert near_edge(labels, radius=0)[0, 0].tolist() == [False] * 3 + [True, True] + [False] * 4
    assert near_edge(labels, radius=2)[0, 2].tolist() == [False] + [True] * 6 + [False] * 2
    assert not near_edge(torch.zeros(1, 4, 4, dtype=torch.long)).any()
