"""eval.py end to end: U2PL-layout checkpoints, saved predictions, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image

from s4mc.cli import eval_main
from s4mc.models import build_model


@pytest.fixture
def setup(toy_root, toy_cfg, tmp_path):
    cfg = toy_cfg(toy_root, tmp_path)
    cfg_path = tmp_path / "config.yaml"
    slim = {k: cfg[k] for k in ("dataset", "trainer", "net", "evaluation", "output_dir")}
    slim["trainer"] = {"epochs": 1}
    cfg_path.write_text(yaml.safe_dump(slim))
    torch.manual_seed(0)
    model = build_model(cfg["net"])
    return cfg, cfg_path, model


def u2pl_checkpoint(model, path):
    """The release's layout: DDP `module.` prefix, student and teacher states."""
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model_state": sd, "teacher_state": sd, "epoch": 3, "best_miou": 0.5}, path)


def test_u2pl_layout_checkpoint_evaluates_and_saves(setup, tmp_path, capsys):
    cfg, cfg_path, model = setup
    ckpt = tmp_path / "ckpt_best.pth"
    u2pl_checkpoint(model, ckpt)
    out_json, preds = tmp_path / "result.json", tmp_path / "preds"
    code = eval_main(["--config", str(cfg_path), "--checkpoint", str(ckpt), "--weights", "teacher",
                      "--save-dir", str(preds), "--overlay", "--json", str(out_json), "--workers", "0",
                      "--device", "cpu", "--refine"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "background" in printed
    result = json.loads(out_json.read_text())
    assert result["num_images"] == 5 and 0.0 <= result["miou"] <= 1.0
    assert result["refined"] is not None
    pngs = sorted(p for p in preds.glob("*.png") if not p.name.endswith("_overlay.png") and p.name != "legend.png")
    assert len(pngs) == 5 and (preds / "legend.png").is_file()  # the class colours, with every --save-dir
    assert Image.open(pngs[0]).mode == "P"
    assert len(list(preds.glob("*_overlay.png"))) == 5


def test_same_numbers_as_in_training_evaluation(setup, tmp_path, capsys):
    """eval.py and the training loop call the same function on the same data."""
    from s4mc.data import build_val_dataset
    from s4mc.data import build_val_loader
    from s4mc.evaluation import evaluate

    cfg, cfg_path, model = setup
    ckpt = tmp_path / "ckpt.pth"
    u2pl_checkpoint(model, ckpt)
    out_json = tmp_path / "r.json"
    assert eval_main(["--config", str(cfg_path), "--checkpoint", str(ckpt), "--json", str(out_json),
                      "--workers", "0", "--device", "cpu"]) == 0
    direct = evaluate(model.eval(), build_val_loader(build_val_dataset(cfg), workers=0), num_classes=6)
    assert json.loads(out_json.read_text())["miou"] == pytest.approx(direct.miou, abs=1e-9)


def test_missing_checkpoint_is_named(setup, tmp_path, capsys):
    _, cfg_path, _ = setup
    missing = tmp_path / "nope.pth"
    assert eval_main(["--config", str(cfg_path), "--checkpoint", str(missing), "--device", "cpu"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_checkpoint_for_another_class_count_is_rejected(setup, tmp_path, capsys):
    cfg, cfg_path, _ = setup
    other = build_model(dict(cfg["net"], num_classes=21))
    ckpt = tmp_path / "voc.pth"
    u2pl_checkpoint(other, ckpt)
    assert eval_main(["--config", str(cfg_path), "--checkpoint", str(ckpt), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "decoder.classifier.8.weight" in err and str(ckpt) in err


def test_unknown_config_key_is_a_clear_error(setup, tmp_path, capsys):
    _, cfg_path, model = setup
    ckpt = tmp_path / "c.pth"
    u2pl_checkpoint(model, ckpt)
    code = eval_main(["--config", str(cfg_path), "--checkpoint", str(ckpt), "--opts", "evaluation.moed=whole"])
    assert code == 2
    assert "evaluation.moed" in capsys.readouterr().err
