"""trainer.method: unimatch at CPU size: strong views, partners, the FP branch, the loss weights,
what S4MC changes, and an exact resume."""

from __future__ import annotations

import pytest
import torch

from s4mc.data import build_train_loaders
from s4mc.distributed import DistInfo
from s4mc.engine import loop
from s4mc.engine.batches import epoch_batches
from s4mc.engine.step import train_step
from s4mc.errors import ConfigError
from s4mc.methods import unimatch as unimatch_mod

UNIMATCH = {"trainer.method": "unimatch", "trainer.eval_on": False, "trainer.unsupervised.mix_prob": 1.0}


def first_batch(cfg):
    loaders = build_train_loaders(cfg, seed=0, strong_views=2)
    partner = build_train_loaders(cfg, seed=7, strong_views=2).unlabeled
    return next(iter(epoch_batches(loaders.labeled, loaders.unlabeled, partner)))


def one_step(cfg, batch, seed: int = 0):
    torch.manual_seed(seed)
    state = loop.build_state(cfg, DistInfo(), iters_per_epoch=10)
    torch.manual_seed(seed + 1)
    return state, train_step(state, [batch], cfg)


def test_the_loader_gives_two_independent_strong_views_and_a_partner(toy_root, toy_cfg, tmp_path):
    cfg = toy_cfg(toy_root, tmp_path, **UNIMATCH)
    _, unlabeled = first_batch(cfg)
    for key in ("image_strong", "image_strong_2", "partner_image", "partner_image_strong_2", "partner_label"):
        assert unlabeled[key].shape[-2:] == unlabeled["image"].shape[-2:], key
    assert not torch.equal(unlabeled["image_strong"], unlabeled["image_strong_2"])
    assert not torch.equal(unlabeled["partner_image"], unlabeled["image"])


def test_the_two_strong_views_get_different_boxes_and_partners(toy_root, toy_cfg, tmp_path, monkeypatch):
    cfg = toy_cfg(toy_root, tmp_path, **UNIMATCH)
    batch = first_batch(cfg)
    masks, pastes = [], []
    sample, apply = unimatch_mod.mixing.sample_mix_mask, unimatch_mod.mixing.apply_mix
    monkeypatch.setattr(unimatch_mod.mixing, "sample_mix_mask", lambda *a, **k: masks.append(sample(*a, **k)) or masks[-1])

    def recording_apply(x, mask, partner=None, fill=None):
        pastes.append((x, mask, partner))
        return apply(x, mask, partner=partner, fill=fill)

    monkeypatch.setattr(unimatch_mod.mixing, "apply_mix", recording_apply)
    one_step(cfg, batch)
    assert len(masks) == 2 and masks[0].any() and masks[1].any()
    assert not torch.equal(masks[0], masks[1])
    # The first two pastes are the strong images: view 1 from the partner batch, view 2 from
    # the partner batch rolled by one, so no image meets the same partner twice.
    (x1, m1, p1), (x2, m2, p2) = pastes[:2]
    assert m1 is masks[0] and m2 is masks[1]
    partner_strong = batch[1]["partner_image_strong"]
    assert torch.equal(p1, partner_strong)
    for i in range(p1.shape[0]):
        assert not torch.equal(p1[i], p2[i])
        assert not torch.equal(p1[i], x1[i]) and not torch.equal(p2[i], x2[i])


@pytest.mark.parametrize("fp", [True, False])
def test_the_feature_perturbation_branch_runs_only_where_configured(toy_root, toy_cfg, tmp_path, monkeypatch, fp):
    cfg = toy_cfg(toy_root, tmp_path, **UNIMATCH, **{"trainer.unimatch.fp": fp})
    from s4mc.models.deeplabv3plus import SegmentationModel

    calls = []
    forward = SegmentationModel.forward

    def recording(self, x, *args, **kwargs):
        calls.append(kwargs.get("perturb"))
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(SegmentationModel, "forward", recording)
    _, metrics = one_step(cfg, first_batch(cfg))
    perturbed = [c for c in calls if c is not None]
    assert ("loss_fp" in metrics) is fp
    if fp:
        n_l = cfg["dataset"]["batch_size"]
        assert perturbed == [(n_l, 2 * n_l)]  # the weak view only, after the labeled images
    else:
        assert perturbed == []


def test_default_loss_weights_and_the_second_authors_variant(toy_root, toy_cfg, tmp_path):
    # threshold 0: every pixel is kept, so each unlabeled term is non-zero.
    cfg = toy_cfg(toy_root, tmp_path, **UNIMATCH, **{"trainer.unsupervised.refine": False,
                                                      "trainer.unimatch.threshold": 0.0})
    assert (cfg["trainer"]["unimatch"]["weight_strong"], cfg["trainer"]["unimatch"]["weight_fp"]) == (0.25, 0.5)
    batch = first_batch(cfg)
    _, m = one_step(cfg, batch)
    assert all(float(m[k]) > 0 for k in ("loss_s1", "loss_s2", "loss_fp"))
    expected = (m["loss_sup"] + 0.25 * m["loss_s1"] + 0.25 * m["loss_s2"] + 0.5 * m["loss_fp"]) / 2
    assert float(m["loss"]) == pytest.approx(float(expected), rel=1e-6)

    variant = toy_cfg(toy_root, tmp_path, **UNIMATCH, **{"trainer.unsupervised.refine": False,
                                                          "trainer.unimatch.threshold": 0.0,
                                                          "trainer.unimatch.fp": False,
                                                          "trainer.unimatch.weight_strong": 0.5})
    _, m = one_step(variant, batch)
    assert "loss_fp" not in m
    assert float(m["loss"]) == pytest.approx(float((m["loss_sup"] + 0.5 * m["loss_s1"] + 0.5 * m["loss_s2"]) / 2),
                                             rel=1e-6)


def test_the_fixed_threshold_keeps_exactly_the_confident_pixels(toy_root, toy_cfg, tmp_path):
    cfg = toy_cfg(toy_root, tmp_path, **UNIMATCH, **{"trainer.unsupervised.refine": False,
                                                      "trainer.unimatch.threshold": 0.5})
    method = unimatch_mod.UniMatch(cfg)
    # Two one-pixel images: p(class 0) = 0.98, and p(class 1) = 0.73.
    logits = torch.tensor([[[[4.0]], [[0.0]]], [[[-1.0]], [[0.0]]]])
    target, stats = method.pseudo_label_target(None, logits, None, 60.0)
    assert target.flatten().tolist() == [0, 1]
    method.threshold = 0.95
    target, _ = method.pseudo_label_target(None, logits, None, 60.0)
    assert target.flatten().tolist() == [0, 255]


def test_s4mc_on_or_off_changes_only_the_masking(toy_root, toy_cfg, tmp_path, monkeypatch):
    """Same state, same batch: the student logits each branch is scored on are identical, and the
    two targets agree wherever both keep a pixel (a kept pixel's class is always its pseudo-label)."""
    batch = None
    seen: dict[bool, list] = {}
    ce = unimatch_mod.masked_ce_sum
    for refine in (False, True):
        cfg = toy_cfg(toy_root, tmp_path, **UNIMATCH, **{"trainer.unsupervised.refine": refine})
        batch = batch or first_batch(cfg)
        calls = seen.setdefault(refine, [])
        monkeypatch.setattr(unimatch_mod, "masked_ce_sum",
                            lambda s, t, i, calls=calls: calls.append((s.detach().clone(), t.clone())) or ce(s, t, i))
        one_step(cfg, batch)
    assert len(seen[False]) == len(seen[True]) == 3  # s1, s2, fp
    for (student_off, target_off), (student_on, target_on) in zip(seen[False], seen[True]):
        assert torch.equal(student_off, student_on)
        both = (target_off != 255) & (target_on != 255)
        assert torch.equal(target_off[both], target_on[both])
        assert not torch.equal(target_off, target_on)


def test_unimatch_resumes_exactly(toy_root, toy_cfg, tmp_path):
    k, m = 2, 2
    opts = {**UNIMATCH, "trainer.unsupervised.refine": True}
    loop.train(toy_cfg(toy_root, tmp_path / "a", **opts, **{"trainer.max_iters": k + m}), name="run")
    loop.train(toy_cfg(toy_root, tmp_path / "b", **opts, **{"trainer.max_iters": k, "trainer.save_every": k}),
               name="run")
    loop.train(toy_cfg(toy_root, tmp_path / "b", **opts, **{"trainer.max_iters": k + m}), name="run", resume="auto")
    a, b = (torch.load(tmp_path / d / "run" / "checkpoints" / "latest.pth", weights_only=True) for d in "ab")
    assert a["iteration"] == b["iteration"] == k + m
    assert a["evaluated_weights"] == "student"  # one model: no EMA teacher unless trainer.unimatch.ema
    for key, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][key]), key


def test_unimatch_refuses_additive_terms(toy_root, toy_cfg, tmp_path):
    with pytest.raises(ConfigError, match="trainer.method.*does not take additive loss terms.*contrastive"):
        toy_cfg(toy_root, tmp_path, **UNIMATCH, **{"trainer.contrastive": {}})


def test_unknown_method_and_bad_unimatch_values_name_the_key(toy_root, toy_cfg, tmp_path):
    with pytest.raises(ConfigError, match="trainer.method.*'unimach' is not a registered method"):
        toy_cfg(toy_root, tmp_path, **{"trainer.method": "unimach"})
    with pytest.raises(ConfigError, match="trainer.unimatch.threshold"):
        toy_cfg(toy_root, tmp_path, **UNIMATCH, **{"trainer.unimatch.threshold": 1.5})
