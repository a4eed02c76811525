"""The training loop on the CPU: a few toy iterations, single process and under torchrun (gloo),
exact resume, non-finite loss handling, the LR schedule, and release-config compatibility."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
import yaml

from s4mc.config import load_config
from s4mc.engine import loop as loop_mod
from s4mc.ema import ema_momentum
from s4mc.engine.optim import poly_lr
from s4mc.engine.step import train_step

REPO = Path(__file__).resolve().parents[1]


def flat_state(sd: dict) -> dict:
    return {k: v.float() for k, v in sd.items() if v.dtype.is_floating_point}


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_toy_run_writes_run_directory_and_evaluates(toy_root, toy_cfg, tmp_path):
    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.max_iters": 3, "trainer.epochs": 1, "trainer.image_every": 2})
    summary = loop_mod.train(cfg, name="smoke")
    run = tmp_path / "smoke"
    for name in ("config.yaml", "environment.json", "train.log", "results.json"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "latest.pth").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/kept_fraction", "train/kept_accuracy_unrefined", "train/flipped_to_keep",
            "val/mIoU"} <= set(tags["scalars"])
    assert any(t.startswith("val/IoU/") for t in tags["scalars"])
    assert tags["images"] == ["unlabeled/image|teacher|pseudo-label|ground-truth"]
    env = json.loads((run / "environment.json").read_text())
    assert env["git_commit"] and env["torch"] == torch.__version__
    assert summary["iterations"] == 3
    final = summary["final"]
    assert 0.0 <= final["miou"] <= 1.0 and final["num_images"] == 5
    ckpt = torch.load(run / "checkpoints" / "latest.pth", weights_only=True)
    for key in ("model_state", "teacher_state", "optimizer_state", "epoch", "best_miou", "iteration"):
        assert key in ckpt
    # The teacher is an EMA of the student, not an alias of it (release bug).
    student, teacher = ckpt["model_state"], ckpt["teacher_state"]
    assert any(not torch.equal(student[k], teacher[k]) for k in student if k.endswith("weight"))


def test_resume_continues_exactly(toy_root, toy_cfg, tmp_path):
    """k+m iterations in one go == k iterations, stop, resume for m (mid-epoch)."""
    k, m = 3, 4
    straight = toy_cfg(toy_root, tmp_path / "a", **{"trainer.max_iters": k + m, "trainer.eval_on": False})
    loop_mod.train(straight, name="run")
    first = toy_cfg(toy_root, tmp_path / "b", **{"trainer.max_iters": k, "trainer.eval_on": False,
                                                 "trainer.save_every": k})
    loop_mod.train(first, name="run")
    second = toy_cfg(toy_root, tmp_path / "b", **{"trainer.max_iters": k + m, "trainer.eval_on": False})
    loop_mod.train(second, name="run", resume="auto")
    a = torch.load(tmp_path / "a" / "run" / "checkpoints" / "latest.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "run" / "checkpoints" / "latest.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == k + m
    assert_states_equal(flat_state(a["model_state"]), flat_state(b["model_state"]))
    assert_states_equal(flat_state(a["teacher_state"]), flat_state(b["teacher_state"]))
    for ga, gb in zip(a["optimizer_state"]["state"].values(), b["optimizer_state"]["state"].values()):
        assert torch.equal(ga["momentum_buffer"], gb["momentum_buffer"])


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(toy_root, toy_cfg, tmp_path, monkeypatch):
    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.eval_on": False, "trainer.save_every": 2, "trainer.log_every": 1})
    calls = {"n": 0}

    def poisoned(state, micro_batches, cfg):
        calls["n"] += 1
        if calls["n"] == 4:
            (labeled, unlabeled), = micro_batches
            micro_batches = [(dict(labeled, image=torch.full_like(labeled["image"], float("nan"))), unlabeled)]
        return train_step(state, micro_batches, cfg)

    monkeypatch.setattr(loop_mod, "train_step", poisoned)
    # The 4th step is iteration 4 in the log's numbering (from 1), and the message says so.
    with pytest.raises(loop_mod.TrainingDiverged, match="non-finite at iteration 4;"):
        loop_mod.train(cfg, name="nan")
    logged = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in logged] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in logged)
    ckpt = torch.load(tmp_path / "nan" / "checkpoints" / "latest.pth", weights_only=True)
    assert ckpt["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in flat_state(ckpt["model_state"]).values())


def test_poly_lr_and_head_multiplier(toy_root, toy_cfg, tmp_path):
    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.head_lr_mult": 10, "trainer.optimizer.kwargs.lr": 0.02})
    dist = loop_mod.DistInfo()
    state = loop_mod.build_state(cfg, dist, iters_per_epoch=6)
    from s4mc.data import build_train_loaders

    tl = build_train_loaders(cfg, seed=0)
    for i, (lab, unl) in enumerate(zip(tl.labeled, tl.unlabeled)):
        if i == 3:
            break
        metrics = train_step(state, [(lab, unl)], cfg)
        expected = 0.02 * (1 - i / state.max_iters) ** 0.9
        assert metrics["lr"].item() == pytest.approx(expected)
        backbone, head = state.optimizer.param_groups
        assert backbone["lr"] == pytest.approx(expected)
        assert head["lr"] == pytest.approx(10 * expected)
    assert poly_lr(1.0, 0, 10) == 1.0 and poly_lr(1.0, 5, 10) == pytest.approx(0.5**0.9)
    assert ema_momentum(7, 7, 0.99) == 0.0 and ema_momentum(1000, 7, 0.99) == 0.99


def test_supervised_only_mode(toy_root, toy_cfg, tmp_path):
    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.mode": "sup", "trainer.max_iters": 2, "trainer.epochs": 1})
    summary = loop_mod.train(cfg, name="sup")
    assert summary["iterations"] == 2 and "final" in summary


def test_release_config_keys_load(tmp_path):
    """A config.yml written with the release's key names and values loads."""
    release = {
        "dataset": {
            "type": "pascal_semi",
            "train": {
                "data_root": "../../../../data/VOC2012",
                "data_list": "../../../../data/splits/pascal/1464/labeled.txt",
                "flip": True,
                "GaussianBlur": False,
                "rand_resize": [0.5, 2.0],
                "crop": {"type": "rand", "size": [513, 513]},
            },
            "val": {
                "data_root": "../../../../data/VOC2012",
                "data_list": "../../../../data/splits/pascal/val.txt",
                "crop": {"type": "center", "size": [513, 513]},
            },
            "batch_size": 1,
            "n_sup": 1464,
            "noise_std": 0.1,
            "workers": 2,
            "mean": [123.675, 116.28, 103.53],
            "std": [58.395, 57.12, 57.375],
            "ignore_label": 255,
        },
        "trainer": {
            "epochs": 80,
            "eval_on": True,
            "optimizer": {"type": "SGD", "kwargs": {"lr": 0.001, "momentum": 0.9, "weight_decay": 0.0001}},
            "lr_scheduler": {"mode": "poly", "kwargs": {"power": 0.9}},
            "unsupervised": {
                "TTA": False,
                "drop_percent": 60,
                "apply_aug": "cutmix",
                "neigborhood_size": 4,
                "n_neigbors": 1,
                "indicator": "margin",
            },
            "contrastive": {
                "negative_high_entropy": True,
                "low_rank": 3,
                "high_rank": 20,
                "current_class_threshold": 0.3,
                "current_class_negative_threshold": 1,
                "unsupervised_entropy_ignore": 80,
                "low_entropy_threshold": 20,
                "num_negatives": 50,
                "num_queries": 256,
                "temperature": 0.5,
            },
        },
        "saver": {"snapshot_dir": "checkpoints", "pretrain": ""},
        "criterion": {"type": "CELoss", "kwargs": {"use_weight": False}},
        "net": {
            "num_classes": 21,
            "sync_bn": True,
            "ema_decay": 0.99,
            "encoder": {
                "type": "u2pl.models.resnet.resnet101",
                "kwargs": {
                    "multi_grid": True,
                    "zero_init_residual": True,
                    "fpn": True,
                    "replace_stride_with_dilation": [False, True, True],
                },
            },
            "decoder": {
                "type": "u2pl.models.decoder.dec_deeplabv3_plus",
                "kwargs": {"inner_planes": 256, "dilations": [12, 24, 36]},
            },
        },
        "main_mode": {"eval": False, "compare": False},
    }
    folder = tmp_path / "experiments" / "pascal" / "1464" / "ours"
    folder.mkdir(parents=True)
    path = folder / "config.yml"
    path.write_text(yaml.safe_dump(release))
    cfg = load_config(path)
    unsup = cfg["trainer"]["unsupervised"]
    assert (unsup["keep_percent"], unsup["mixing"], unsup["neighborhood_size"], unsup["num_neighbors"]) == (
        60, "cutmix", 4, 1)
    assert cfg["dataset"]["type"] == "pascal" and cfg["trainer"]["contrastive"]["num_queries"] == 256
    assert cfg["dataset"]["train"]["data_root"] == str((tmp_path / "data" / "VOC2012").resolve())
    from s4mc.models import build_model

    model = build_model(cfg["net"])  # release type strings reach the same builders
    assert sum(p.numel() for p in model.parameters()) == 64_459_989




@pytest.mark.slow
def test_torchrun_two_processes_gloo(toy_root, tmp_path):
    """Two CPU ranks: equal parameters after steps, only rank 0 writes, metrics reduced."""
    cfg_path = tmp_path / "toy.yaml"
    data = yaml.safe_load((REPO / "experiments" / "toy" / "config.yaml").read_text())
    data["output_dir"] = str(tmp_path / "runs")
    data["dataset"]["workers"] = 0
    data["dataset"]["batch_size"] = 2
    for split in ("train", "val"):
        data["dataset"][split]["data_root"] = str(toy_root)
    data["dataset"]["train"]["data_list"] = str(toy_root / "splits" / "labeled.txt")
    data["dataset"]["train"]["unlabeled_list"] = str(toy_root / "splits" / "train_all.txt")
    data["dataset"]["val"]["data_list"] = str(toy_root / "splits" / "val.txt")
    data["dataset"]["train"]["crop"]["size"] = [40, 40]
    data["net"]["encoder"]["pretrained"] = None  # the shipped toy encoder is width 16
    data["evaluation"]["compare_with"] = None
    data["trainer"].update({"epochs": 1, "sup_only_epoch": 0, "max_iters": 3, "log_every": 1})
    data["net"]["encoder"]["kwargs"]["width"] = 8
    cfg_path.write_text(yaml.safe_dump(data))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "train_semi.py"), "--config", str(cfg_path), "--name", "ddp", "--device", "cpu", "--debug-dump"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    ckpt = torch.load(run / "checkpoints" / "latest.pth", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng_states"]) == 2
    # Only rank 0 logs to the console and writes files: one log line per iteration, one run dir.
    assert proc.stdout.count("iter 3/") == 1
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp"]
    # Rank 1 writes its parameters next to rank 0's through the test hook; they must match.
    results = json.loads((run / "results.json").read_text())
    assert results["final"]["num_images"] == 5  # every validation image counted once across ranks
    dumps = [torch.load(run / f"debug_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert_states_equal(dumps[0]["params"], dumps[1]["params"])
    # The logged metrics are the mean over ranks of each rank's own values.
    local0, local1 = dumps[0]["local_metrics"], dumps[1]["local_metrics"]
    assert local0["loss"] != local1["loss"]  # different data per rank
    for key in ("loss", "loss_unsup", "kept_fraction"):
        assert dumps[0]["reduced_metrics"][key] == pytest.approx((local0[key] + local1[key]) / 2, rel=1e-6)
        assert dumps[1]["reduced_metrics"][key] == pytest.approx(dumps[0]["reduced_metrics"][key], rel=1e-6)


def test_a_raw_keyboard_interrupt_saves_nothing_mid_step(toy_root, toy_cfg, tmp_path, monkeypatch):
    """Ctrl-C stops at an iteration boundary (tests/test_reliability.py); a KeyboardInterrupt that
    bypasses that (a second, deliberate Ctrl-C) must not save a half-done step."""
    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.eval_on": False, "trainer.save_every": 1})
    calls = {"n": 0}

    def interrupted(state, micro_batches, cfg):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return train_step(state, micro_batches, cfg)

    monkeypatch.setattr(loop_mod, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loop_mod.train(cfg, name="ctrl_c")
    ckpt = torch.load(tmp_path / "ctrl_c" / "checkpoints" / "latest.pth", weights_only=True)
    assert ckpt["iteration"] == 2 and ckpt["epoch"] == 0


def test_batch_of_one_without_sync_bn_is_a_clear_error(toy_root, toy_cfg, tmp_path):
    from s4mc.errors import ConfigError

    cfg = toy_cfg(toy_root, tmp_path, **{"dataset.batch_size": 1, "trainer.sup_only_epoch": 1})
    with pytest.raises(ConfigError, match="dataset.batch_size = 1"):
        loop_mod.train(cfg, name="b1")


def test_centre_crop_selects_best_and_whole_image_is_logged_beside(toy_root, toy_cfg, tmp_path):
    """The VOC configs' in-training protocol: centre crop with the padding labelled 0 selects
    best.pth; the whole-image mIoU (evaluation.mode) is logged and saved beside it."""
    cfg = toy_cfg(toy_root, tmp_path, **{
        "trainer.max_iters": 2, "trainer.epochs": 1, "dataset.val.crop.type": "center",
        "dataset.val.crop.size": [64, 64], "dataset.val.crop.pad_label": 0, "evaluation.mode": "whole",
        "saver.checkpoint_dir": "ck"})
    summary = loop_mod.train(cfg, name="proto")
    run = tmp_path / "proto"
    final, whole = summary["final"], summary["final_also"]["whole"]
    assert final["mode"] == "center_crop" and final["options"]["pad_label"] == 0
    # 48 px images padded to 64: the padding is scored as class 0, so more pixels count.
    assert sum(map(sum, final["confusion"])) == 5 * 64 * 64
    assert sum(map(sum, whole["confusion"])) < 5 * 48 * 48 + 1
    assert summary["best_miou"] == pytest.approx(final["miou"])
    log_text = (run / "train.log").read_text()
    assert "center_crop" in log_text and ", whole " in log_text
    assert (run / "ck" / "best.pth").is_file() and (run / "ck" / "latest.pth").is_file()
    assert not (run / "checkpoints").exists()  # saver.checkpoint_dir is where checkpoints go


def test_n_sup_must_match_the_labeled_list(toy_root, toy_cfg, tmp_path):
    from s4mc.errors import ConfigError

    cfg = toy_cfg(toy_root, tmp_path, **{"dataset.n_sup": 7, "trainer.eval_on": False})
    with pytest.raises(ConfigError, match="dataset.n_sup = 7 .* lists 8 labeled"):
        loop_mod.train(cfg, name="nsup")
