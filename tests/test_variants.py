"""Each training variant runs a few CPU iterations from its config; LR scaling; the
contrastive memory bank survives a checkpoint/resume round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from s4mc.config import load_config
from s4mc.distributed import DistInfo
from s4mc.engine import loop, optim
from s4mc.engine.step import train_step

REPO = Path(__file__).resolve().parents[1]

VARIANTS = {
    "s4mc": {},
    "cutmix_seg": {"trainer.unsupervised.refine": False},
    "s4mc_psi": {"trainer.unsupervised.strong_aug": True},
    "s4mc_u2pl": {"trainer.contrastive": {"num_queries": 16, "num_negatives": 8, "memory_capacity": 64}},
    "classmix_entropy": {"trainer.unsupervised.mixing": "classmix", "trainer.unsupervised.indicator": "entropy"},
    "cutout_confidence": {"trainer.unsupervised.mixing": "cutout", "trainer.unsupervised.indicator": "confidence"},
    "batch1_partner": {"dataset.batch_size": 1, "trainer.unsupervised.mix_prob": 1.0},
    "per_iteration_keep": {"trainer.unsupervised.keep_schedule": "iteration"},
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_trains_a_few_iterations(name, toy_root, toy_cfg, tmp_path):
    overrides = {"trainer.max_iters": 2, "trainer.eval_on": False, **VARIANTS[name]}
    if name == "batch1_partner":
        # BN on one sample would fail in the warm-up forward; the semi step sees 2 (labeled + mixed).
        overrides["trainer.sup_only_epoch"] = 0
    cfg = toy_cfg(toy_root, tmp_path, **overrides)
    summary = loop.train(cfg, name=name)
    assert summary["iterations"] == 2
    ckpt = torch.load(tmp_path / name / "checkpoints" / "latest.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model_state"].values() if v.dtype.is_floating_point)


def test_psi_student_sees_strong_view(toy_root, toy_cfg, tmp_path):
    from s4mc.data import build_train_loaders

    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.unsupervised.strong_aug": True})
    unlabeled = next(iter(build_train_loaders(cfg, seed=0, strong_views=1).unlabeled))
    assert unlabeled["image_strong"].shape == unlabeled["image"].shape
    assert not torch.equal(unlabeled["image_strong"], unlabeled["image"])


def test_contrastive_memory_survives_resume(toy_root, toy_cfg, tmp_path):
    over = {"trainer.eval_on": False, "trainer.contrastive": {"num_queries": 16, "num_negatives": 8,
                                                               "memory_capacity": 64}}
    cfg = toy_cfg(toy_root, tmp_path, **over, **{"trainer.max_iters": 2})
    loop.train(cfg, name="bank")
    ckpt = torch.load(tmp_path / "bank" / "checkpoints" / "latest.pth", weights_only=True)
    saved = ckpt["term_states"]["contrastive"]
    assert saved is not None
    state = loop.build_state(cfg, DistInfo(), iters_per_epoch=8)
    before = [state.terms["contrastive"].memory.size(c) for c in range(6)]
    from s4mc.engine import checkpoint

    checkpoint.restore(state, ckpt, "latest.pth")
    after = [state.terms["contrastive"].memory.size(c) for c in range(6)]
    assert sum(before) == 0 and sum(after) > 0
    for c in range(6):
        if after[c]:
            ref = loop.build_state(cfg, DistInfo(), iters_per_epoch=8).terms["contrastive"].memory
            ref.load_state_dict(saved)
            assert torch.equal(state.terms["contrastive"].memory.features(c), ref.features(c))
    # a checkpoint from before the plug-in terms kept the bank under "memory_state"
    old = {k: v for k, v in ckpt.items() if k != "term_states"}
    old["memory_state"] = saved
    legacy = loop.build_state(cfg, DistInfo(), iters_per_epoch=8)
    checkpoint.restore(legacy, old, "old.pth")
    assert [legacy.terms["contrastive"].memory.size(c) for c in range(6)] == after


def test_linear_lr_scaling(toy_root, toy_cfg, tmp_path):
    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.lr_scaling": "linear", "trainer.reference_batch": 16,
                                         "dataset.batch_size": 2, "trainer.optimizer.kwargs.lr": 0.01,
                                         "trainer.head_lr_mult": 10})
    state = loop.build_state(cfg, DistInfo(), iters_per_epoch=8)
    backbone, head = state.optimizer.param_groups
    # global batch 2 × 1 process over the reference 16
    assert backbone["initial_lr"] == pytest.approx(0.01 * 2 / 16)
    assert head["initial_lr"] == pytest.approx(0.01 * 2 / 16 * 10)
    assert optim.lr_scale(cfg, world_size=8) == pytest.approx(1.0)
    off = toy_cfg(toy_root, tmp_path, **{"trainer.optimizer.kwargs.lr": 0.01})
    assert loop.build_state(off, DistInfo(), iters_per_epoch=8).optimizer.param_groups[0]["initial_lr"] == 0.01


def test_variant_configs_ship_for_every_classic_split():
    for split in (92, 183, 366, 732, 1464):
        psi = load_config(REPO / "experiments" / "pascal_psi" / str(split) / "config.yaml")
        assert psi["trainer"]["unsupervised"]["strong_aug"] is True
        u2pl = load_config(REPO / "experiments" / "pascal_u2pl" / str(split) / "config.yaml")
        assert u2pl["trainer"]["contrastive"]["num_queries"] == 256


def test_step_returns_pseudo_label_diagnostics(toy_root, toy_cfg, tmp_path):
    from s4mc.data import build_train_loaders

    cfg = toy_cfg(toy_root, tmp_path)
    state = loop.build_state(cfg, DistInfo(), iters_per_epoch=8)
    tl = build_train_loaders(cfg, seed=0)
    metrics = train_step(state, [(next(iter(tl.labeled)), next(iter(tl.unlabeled)))], cfg)
    for key in ("kept_fraction", "kept_fraction_unrefined", "kept_accuracy", "kept_accuracy_unrefined",
                "kept_accuracy_same_share", "flipped_to_keep", "flipped_to_drop", "threshold"):
        assert key in metrics, key
    # keep-percent 60 at epoch 0: without refinement about 60% of valid pixels are kept
    assert float(metrics["kept_fraction_unrefined"]) == pytest.approx(0.6, abs=0.02)


@pytest.mark.parametrize("teacher_start", ["parameters", "all"])
def test_teacher_start_copies_parameters_and_optionally_bn_statistics(teacher_start, toy_root, toy_cfg, tmp_path):
    from s4mc.methods.base import begin_semi_phase

    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.teacher_start": teacher_start})
    state = loop.build_state(cfg, DistInfo(), iters_per_epoch=8)
    with torch.no_grad():  # a warmed-up student, and a teacher whose BN warmed up on other weights
        for p in state.student_module.parameters():
            p.add_(0.01)
        for name, b in state.student_module.named_buffers():
            if name.endswith("running_mean"):
                b.add_(0.5)
    teacher_stats = {k: v.clone() for k, v in state.teacher.state_dict().items() if "running_" in k}
    state.iteration = 5
    begin_semi_phase(state, cfg)
    assert state.semi_start == 5
    student, teacher = state.student_module.state_dict(), state.teacher.state_dict()
    assert all(torch.equal(teacher[k], student[k]) for k, _ in state.student_module.named_parameters())
    moved = [k for k in teacher_stats if not torch.equal(teacher[k], teacher_stats[k])]
    if teacher_start == "all":  # the teacher is exactly the student, statistics included
        assert moved and all(torch.equal(teacher[k], v) for k, v in student.items())
    else:  # the release: parameters only, the teacher keeps its own statistics
        assert moved == []
    begin_semi_phase(state, cfg)  # only the first semi step copies
    assert state.semi_start == 5
