"""The run header: the protocol a run follows, logged at start and stored in environment.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from s4mc.cli import train_main
from s4mc.config import load_config
from s4mc.engine import optim
from s4mc.engine.run_header import build_run_header, format_run_header, main, preview_run_header
from s4mc.models import build_model

REPO = Path(__file__).resolve().parents[1]


def fake_voc(root: Path, n_labeled=4, n_unlabeled=12, n_val=3) -> Path:
    """A VOC tree (JPEGImages, SegmentationClassAug) with U2PL-style split lists."""
    rng = np.random.default_rng(0)
    ids = [f"2008_{i:06d}" for i in range(n_labeled + n_unlabeled + n_val)]
    for sid in ids:
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        (root / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "JPEGImages" / f"{sid}.jpg"), rng.integers(0, 256, (36, 44, 3), dtype=np.uint8))
        Image.fromarray(rng.integers(0, 21, (36, 44), dtype=np.uint8)).save(root / "SegmentationClassAug" / f"{sid}.png")
    splits = root / "splits" / "366"
    splits.mkdir(parents=True)
    (splits / "labeled.txt").write_text("\n".join(ids[:n_labeled]) + "\n")
    (splits / "unlabeled.txt").write_text("\n".join(ids[n_labeled:n_labeled + n_unlabeled]) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(ids[n_labeled + n_unlabeled:]) + "\n")
    return root


def test_header_on_a_voc_config_with_a_fake_data_root(tmp_path, capsys):
    root = fake_voc(tmp_path / "VOC2012")
    opts = [
        f"output_dir={tmp_path / 'runs'}",
        f"dataset.train.data_root={root}", f"dataset.train.data_list={root / 'splits/366/labeled.txt'}",
        f"dataset.val.data_root={root}", f"dataset.val.data_list={root / 'splits/val.txt'}",
        "dataset.batch_size=2", "dataset.workers=0", "dataset.train.crop.size=[32,32]",
        # A tiny network: the header does not depend on its size, the test's run time does.
        "net.encoder.pretrained=null", "net.encoder.type=resnet_tiny", "net.encoder.kwargs.width=8",
        "net.decoder.kwargs.inner_planes=16", "net.decoder.kwargs.low_conv_planes=16",
        "net.decoder.kwargs.dilations=[2,4,6]", "trainer.max_iters=1",
        "dataset.n_sup=null",  # the fake tree lists 4 labeled images; n_sup 366 would be refused
    ]
    code = train_main(["--config", str(REPO / "experiments/pascal/366/config.yaml"), "--device", "cpu",
                       "--name", "voc", "--opts", *opts])
    assert code == 0
    out = capsys.readouterr().out
    block = out[out.index("run protocol:"):]
    lines = {m.group(1): m.group(2) for m in re.finditer(r"^  (\w+) +(.+)$", block, re.M)}
    assert lines["dataset"].startswith("VOC classic, 4 labeled / 12 unlabeled (split lists as loaded), 3 val images")
    assert lines["batch"].startswith("2 labeled + 2 unlabeled per process × 1 process(es) × accumulate 1 "
                                     "= global 2 + 2; recipe 16 + 16 (DIFFERS)")
    assert lines["lr"].startswith("backbone 0.001, head 0.01 (poly, power 0.9, lr_scaling none)")
    # 12 unlabeled images / (2 per process × 1 process) = 6 steps per epoch, 80 epochs.
    assert lines["schedule"].startswith("80 epochs (1 supervised-only) × 6 optimizer steps = 480 steps")
    assert "stops at 1" in lines["schedule"]
    # The VOC configs select best.pth by U2PL's centre crop (dataset.val.crop.type: center), not by
    # evaluation.mode, which is logged beside it.
    assert lines["evaluation"] == ("center_crop (centre crop 513×513, padding labelled 0, single scale) every 1 "
                                   "epoch(s), selects best.pth; logged beside it: whole (whole image, single scale)")
    assert lines["start"] == "random: no pretrained weights (resnet_tiny encoder)"
    assert lines["precision"] == "amp off, channels_last off, compile off"
    assert lines["target"] == ("75.41 mIoU (S4MC paper (arXiv 2308.13900), PASCAL VOC classic table, "
                               "S4MC + CutMix-Seg, 366 labels)")
    assert "mixing cutmix" in lines["method"] and "refinement on (4-neighbourhood" in lines["method"]
    # 2 + 2 on one process is not the recipe's 16 + 16 and nothing scales the LR: one warning,
    # with both numbers and both fixes, after the block.
    warnings = [line for line in out.splitlines() if "differs from the recipe's" in line]
    assert len(warnings) == 1
    assert "global batch 2 + 2" in warnings[0] and "recipe's 16 + 16" in warnings[0]
    assert "trainer.accumulate (auto" in warnings[0] and "trainer.lr_scaling: linear" in warnings[0]
    assert out.index("run protocol:") < out.index(warnings[0])

    env = json.loads((tmp_path / "runs" / "voc" / "environment.json").read_text())
    assert "git_commit" in env  # the header is added to the run info, not written instead of it
    facts = env["protocol"]
    assert facts["dataset"]["labeled_images"] == 4 and facts["dataset"]["unlabeled_images"] == 12
    assert facts["batch"]["global"] == {"labeled": 2, "unlabeled": 2}
    assert facts["batch"]["recipe_global"] == {"labeled": 16, "unlabeled": 16}
    assert facts["lr"]["groups"] == pytest.approx({"backbone": 0.001, "head": 0.01})
    assert facts["schedule"]["optimizer_steps_per_epoch"] == 6
    assert facts["schedule"]["optimizer_steps_total"] == 1
    assert [(e["mode"], e["selects_best"]) for e in facts["evaluation"]] == [("center_crop", True), ("whole", False)]
    results = json.loads((tmp_path / "runs" / "voc" / "results.json").read_text())
    assert results["selected_by"] == "center_crop" and results["final"]["mode"] == "center_crop"
    assert facts["target"]["published_miou"] == 75.41
    assert facts["batch"]["warning"] in warnings[0]
    assert format_run_header(facts) in block  # the stored facts give back the logged block

    # The preview (no images, no run) states the same protocol as the run did.
    preview = preview_run_header(load_config(REPO / "experiments/pascal/366/config.yaml", opts), 1, "cpu")
    for key in ("batch", "lr", "schedule", "method", "start", "evaluation", "precision", "target"):
        assert preview[key] == facts[key], key
    assert (preview["dataset"]["labeled_images"], preview["dataset"]["unlabeled_images"]) == (4, 12)


def test_header_states_scaled_lr_world_size_and_accumulation(toy_root, toy_cfg, tmp_path):
    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.lr_scaling": "linear", "trainer.head_lr_mult": 10,
                                         "evaluation.mode": "sliding", "evaluation.flip": True,
                                         "evaluation.crop_size": 24})
    optimizer = optim.build_optimizer(build_model(cfg["net"]), cfg, world_size=2)
    facts = build_run_header(cfg, world_size=2, optimizer=optimizer, iters_per_epoch=10, labeled_images=8,
                             unlabeled_images=24, val_images=5, amp_dtype=torch.bfloat16, channels_last=True,
                             accumulate=2)
    # lr 0.01 × (2 per process × 2 processes) / reference 16; the head ×10.
    assert facts["lr"]["groups"] == pytest.approx({"backbone": 0.0025, "head": 0.025})
    assert facts["batch"]["global"] == {"labeled": 8, "unlabeled": 8}
    assert facts["schedule"]["optimizer_steps_per_epoch"] == 5
    text = format_run_header(facts)
    assert "× 2 process(es) × accumulate 2 = global 8 + 8\n" in text  # the toy config states no recipe batch
    assert "sliding (sliding window 24×24, single scale, flip)" in text
    assert "amp bfloat16, channels_last on, compile off" in text
    assert "no published number (recipe.published_miou not set in the config)" in text


def test_header_without_loaders_counts_the_split_files(tmp_path):
    """The header needs no images: without loaded datasets it counts the split lists, and
    without those it says the count is the config's own dataset.n_sup."""
    splits = tmp_path / "splits" / "366"
    splits.mkdir(parents=True)
    (splits / "labeled.txt").write_text("# a comment line\n" + "".join(f"img{i}\n" for i in range(366)))
    (splits / "unlabeled.txt").write_text("".join(f"u{i} u{i}.png\n" for i in range(10216)) + "\n\n")
    cfg = load_config(REPO / "experiments/pascal/366/config.yaml",
                      [f"dataset.train.data_list={splits / 'labeled.txt'}", "dataset.batch_size=4",
                       "net.encoder.pretrained=null"])
    optimizer = torch.optim.SGD([{"params": [torch.zeros(1)], "initial_lr": 0.001, "name": "backbone"},
                                 {"params": [torch.zeros(1)], "initial_lr": 0.01, "name": "head"}], lr=0.001)
    facts = build_run_header(cfg, world_size=4, optimizer=optimizer, iters_per_epoch=638, labeled_images=None,
                             unlabeled_images=None, val_images=None, amp_dtype=None, channels_last=False)
    text = format_run_header(facts)
    assert "VOC classic, 366 labeled / 10,216 unlabeled (split files)" in text
    # 4 per process × 4 processes = the recipe's 16 + 16: no warning, no DIFFERS.
    assert "= global 16 + 16; recipe 16 + 16\n" in text
    assert facts["batch"]["warning"] is None

    (splits / "labeled.txt").unlink()
    cfg["dataset"]["train"]["unlabeled_list"] = None
    facts = build_run_header(cfg, world_size=1, optimizer=optimizer, iters_per_epoch=2554, labeled_images=None,
                             unlabeled_images=None, val_images=None, amp_dtype=None, channels_last=False)
    assert ("VOC classic, 366 labeled / 10,216 unlabeled (split files; labeled from dataset.n_sup, its split "
            "file not found)") in format_run_header(facts)
    assert "4 + 4" in facts["batch"]["warning"] and "16 + 16" in facts["batch"]["warning"]
    # Linear LR scaling is the other accepted answer to a smaller batch: then no warning.
    cfg["trainer"]["lr_scaling"] = "linear"
    assert build_run_header(cfg, world_size=1, optimizer=optimizer, iters_per_epoch=2554, labeled_images=366,
                            unlabeled_images=10216, val_images=None, amp_dtype=None,
                            channels_last=False)["batch"]["warning"] is None


def test_preview_command_on_the_voc_config(tmp_path, capsys):
    """python -m s4mc.engine.run_header: the header of a 4-GPU VOC 366 run from its split files alone."""
    splits = tmp_path / "splits"
    (splits / "366").mkdir(parents=True)
    (splits / "366" / "labeled.txt").write_text("".join(f"2007_{i:06d}\n" for i in range(366)))
    (splits / "366" / "unlabeled.txt").write_text("".join(f"2008_{i:06d}\n" for i in range(10216)))
    (splits / "val.txt").write_text("".join(f"2009_{i:06d}\n" for i in range(1449)))
    args = ["--config", str(REPO / "experiments/pascal/366/config.yaml"), "--opts",
            f"dataset.train.data_list={splits / '366/labeled.txt'}", f"dataset.val.data_list={splits / 'val.txt'}",
            "net.encoder.type=resnet_tiny", "net.encoder.kwargs.width=8"]  # LR groups do not depend on size
    assert main(["--world-size", "4", *args]) == 0
    out = capsys.readouterr().out
    assert "VOC classic, 366 labeled / 10,216 unlabeled (split files), 1,449 val images" in out
    assert ("4 labeled + 4 unlabeled per process × 4 process(es) × accumulate 1 = global 16 + 16; "
            "recipe 16 + 16\n") in out
    # ceil(10,216 / 4 ranks) = 2,554 images per rank, 638 full batches of 4.
    assert "80 epochs (1 supervised-only) × 638 optimizer steps = 51,040 steps" in out
    assert "amp bfloat16, channels_last on" in out and "warning" not in out

    assert main(["--world-size", "1", "--device", "cpu", *args]) == 0
    out = capsys.readouterr().out
    assert "× 2,554 optimizer steps" in out and "amp off, channels_last off" in out
    assert "warning: global batch 4 + 4 (4 per process × 1 process(es) × accumulate 1) differs from the " \
           "recipe's 16 + 16" in out

    (splits / "366" / "unlabeled.txt").unlink()
    assert main(["--world-size", "4", *args]) == 2
    err = capsys.readouterr().err
    assert f"split file not found: {splits / '366' / 'unlabeled.txt'}" in err and "Traceback" not in err


def test_supervised_mode_header(toy_root, toy_cfg, tmp_path):
    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.mode": "sup", "trainer.eval_on": False})
    optimizer = optim.build_optimizer(build_model(cfg["net"]), cfg, world_size=1)
    facts = build_run_header(cfg, world_size=1, optimizer=optimizer, iters_per_epoch=4, labeled_images=8,
                             unlabeled_images=None, val_images=None, amp_dtype=None, channels_last=False)
    text = format_run_header(facts)
    assert "8 labeled (split lists as loaded)" in text and "unlabeled (split" not in text
    assert "2 labeled + 0 unlabeled per process" in text
    assert "supervised only" in text and "evaluation  off (trainer.eval_on: false)" in text


@pytest.mark.parametrize("teacher_start", ["parameters", "all"])
def test_header_says_when_the_teacher_takes_the_students_bn_statistics(teacher_start, toy_root, toy_cfg, tmp_path):
    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.teacher_start": teacher_start})
    optimizer = optim.build_optimizer(build_model(cfg["net"]), cfg, world_size=1)
    facts = build_run_header(cfg, world_size=1, optimizer=optimizer, iters_per_epoch=4, labeled_images=8,
                             unlabeled_images=8, val_images=None, amp_dtype=None, channels_last=False)
    assert facts["method"]["teacher_start"] == teacher_start
    said = "teacher starts as the student with its BN statistics" in format_run_header(facts)
    assert said == (teacher_start == "all")


@pytest.mark.parametrize("refine", [True, False])
def test_unimatch_header_names_the_method(toy_root, toy_cfg, tmp_path, refine):
    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.method": "unimatch", "trainer.unsupervised.refine": refine,
                                          "trainer.unimatch.fp": False, "trainer.unimatch.weight_strong": 0.5})
    optimizer = optim.build_optimizer(build_model(cfg["net"]), cfg, world_size=1)
    facts = build_run_header(cfg, world_size=1, optimizer=optimizer, iters_per_epoch=4, labeled_images=8,
                             unlabeled_images=16, val_images=5, amp_dtype=None, channels_last=False)
    method = next(line for line in format_run_header(facts).splitlines() if line.strip().startswith("method"))
    assert "UniMatch (single model)" in method and "weight 0.5 each" in method
    assert "feature perturbation off" in method and "mixing" not in method
    assert ("S4MC refinement on" in method) == refine and ("fixed confidence threshold 0.95" in method) != refine
    assert facts["method"]["name"] == "unimatch" and facts["method"]["settings"]["fp"] is False


def _readme_row(label: str) -> list[float]:
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label and len(cells) == 6 and all(re.fullmatch(r"[\d.]+", c) for c in cells[1:]):
            return [float(c) for c in cells[1:]]  # the published-numbers table, not the variants table
    raise AssertionError(f"README has no table row {label!r}")


def test_every_experiment_states_its_recipe_and_the_readme_numbers():
    cutmix = dict(zip((92, 183, 366, 732, 1464), _readme_row("S4MC + CutMix-Seg")))
    psi = dict(zip((92, 183, 366, 732, 1464), _readme_row("S4MC + FixMatch (S4MC ψ)")))
    configs = sorted((REPO / "experiments").rglob("config.yaml"))
    assert len(configs) >= 24
    for path in configs:
        recipe = load_config(path)["recipe"]
        assert recipe["global_batch"]["labeled"] and recipe["global_batch"]["unlabeled"], path
        assert recipe["dataset"] and recipe["source"], path  # a null number still says why
        family, split = path.parent.parent.name, path.parent.name
        if family == "pascal":
            assert recipe["published_miou"] == cutmix[int(split)], path
        elif family == "pascal_psi":
            assert recipe["published_miou"] == psi[int(split)], path
