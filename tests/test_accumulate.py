"""trainer.accumulate: N micro-batches per optimizer step (README, "Gradient accumulation")."""

from __future__ import annotations

import json

import pytest
import torch

import s4mc.models
from s4mc.config import load_config
from s4mc.distributed import DistInfo
from s4mc.engine import loop, optim
from s4mc.engine.step import train_step
from s4mc.errors import ConfigError


def _without_batch_statistics(monkeypatch):
    """Models whose BatchNorm and dropout layers are identities: nothing depends on how the images are
    split into batches, or on a random draw, so accumulation must match one big batch exactly."""
    build = s4mc.models.build_model

    def build_plain(net_cfg):
        model = build(net_cfg)
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)):
                    setattr(module, child_name, torch.nn.Identity())
        return model

    monkeypatch.setattr(loop, "build_model", build_plain)  # where build_state finds it


def _state(cfg):
    torch.manual_seed(0)
    return loop.build_state(cfg, DistInfo(device=torch.device("cpu")), iters_per_epoch=10)


def test_two_micro_batches_of_2_equal_one_batch_of_4(toy_root, toy_cfg, tmp_path, monkeypatch):
    _without_batch_statistics(monkeypatch)
    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.mode": "sup"})
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 40, 40, generator=g)
    labels = torch.randint(0, 6, (4, 40, 40), generator=g)  # every pixel valid: the means compose exactly
    big, small = _state(cfg), _state(cfg)
    for a, b in zip(big.student_module.parameters(), small.student_module.parameters()):
        assert torch.equal(a, b)
    m_big = train_step(big, [({"image": images, "label": labels}, None)], cfg)
    m_small = train_step(small, [({"image": images[:2], "label": labels[:2]}, None),
                                 ({"image": images[2:], "label": labels[2:]}, None)], cfg)
    assert big.iteration == small.iteration == 1
    moved = 0
    for (name, a), b in zip(big.student_module.named_parameters(), small.student_module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(a, _state(cfg).student_module.get_parameter(name)))
    assert moved > 0  # the step did something
    torch.testing.assert_close(m_big["loss"], m_small["loss"], rtol=1e-5, atol=1e-6)


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lr_and_ema_schedules_count_optimizer_steps(toy_root, toy_cfg, tmp_path):
    common = {"trainer.epochs": 2, "trainer.sup_only_epoch": 1, "trainer.log_every": 1, "trainer.eval_on": False}
    big = toy_cfg(toy_root, tmp_path, **common, **{"dataset.batch_size": 4})
    small = toy_cfg(toy_root, tmp_path, **common, **{"dataset.batch_size": 2, "trainer.accumulate": 2})
    loop.train(big, name="big")
    loop.train(small, name="small")
    runs = {}
    for name in ("big", "small"):
        train = [r for r in _jsonl(tmp_path / name / "metrics.jsonl") if r["kind"] == "train"]
        ckpt = torch.load(tmp_path / name / "checkpoints" / "latest.pth", weights_only=False)
        runs[name] = ([r["iteration"] for r in train], [r["lr"] for r in train], ckpt)
    (it_big, lr_big, ck_big), (it_small, lr_small, ck_small) = runs["big"], runs["small"]
    assert it_big == it_small and len(it_big) == ck_big["iteration"] == ck_small["iteration"] > 2
    assert lr_big == lr_small  # the same poly curve, step for step
    # the EMA ramp starts at the same optimizer step
    assert ck_big.get("semi_start") == ck_small.get("semi_start")


def test_resume_between_accumulated_steps_is_exact(toy_root, toy_cfg, tmp_path):
    """k+m steps in one go == k steps, stop, resume for m, with 2 micro-batches per step."""
    from tests.test_train import assert_states_equal, flat_state

    k, m, acc = 2, 3, {"trainer.accumulate": 2, "trainer.eval_on": False}
    loop.train(toy_cfg(toy_root, tmp_path / "a", **acc, **{"trainer.max_iters": k + m}), name="run")
    loop.train(toy_cfg(toy_root, tmp_path / "b", **acc, **{"trainer.max_iters": k, "trainer.save_every": k}), name="run")
    loop.train(toy_cfg(toy_root, tmp_path / "b", **acc, **{"trainer.max_iters": k + m}), name="run", resume="auto")
    a = torch.load(tmp_path / "a" / "run" / "checkpoints" / "latest.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "run" / "checkpoints" / "latest.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == k + m
    assert_states_equal(flat_state(a["model_state"]), flat_state(b["model_state"]))
    assert_states_equal(flat_state(a["teacher_state"]), flat_state(b["teacher_state"]))
    # another accumulation on resume would change the schedule: refused, naming the key
    with pytest.raises(ConfigError, match="trainer.accumulate"):
        loop.train(toy_cfg(toy_root, tmp_path / "b", **{"trainer.accumulate": 1, "trainer.eval_on": False,
                                                       "trainer.max_iters": k + m + 1}), name="run", resume="auto")


@pytest.mark.parametrize("bad", [True, 0, -2, "sometimes", 1.5])
def test_accumulate_rejects_bad_values(bad, toy_root, toy_cfg, tmp_path):
    with pytest.raises(ConfigError, match="trainer.accumulate"):
        toy_cfg(toy_root, tmp_path, **{"trainer.accumulate": bad})


def test_auto_reaches_the_recipe_batch(toy_root, toy_cfg, tmp_path):
    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.accumulate": "auto", "dataset.batch_size": 2,
                                          "recipe.global_batch": {"labeled": 16, "unlabeled": 16}})
    assert optim.resolve_accumulate(cfg, world_size=4) == 2
    assert optim.resolve_accumulate(cfg, world_size=1) == 8
    # and linear LR scaling sees the accumulated batch
    cfg["trainer"]["lr_scaling"], cfg["trainer"]["reference_batch"] = "linear", 16
    assert optim.lr_scale(cfg, world_size=4) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match=r"16 is not a multiple of 6"):
        optim.resolve_accumulate(cfg, world_size=3)
    no_recipe = toy_cfg(toy_root, tmp_path, **{"trainer.accumulate": "auto"})
    no_recipe["recipe"]["global_batch"] = None
    with pytest.raises(ConfigError, match="recipe.global_batch"):
        optim.resolve_accumulate(no_recipe, world_size=1)


def test_header_states_the_accumulation(toy_root, toy_cfg, tmp_path):
    from s4mc.engine.run_header import build_run_header, format_run_header
    from s4mc.models import build_model

    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.accumulate": 2, "recipe.global_batch": {"labeled": 4, "unlabeled": 4}})
    optimizer = optim.build_optimizer(build_model(cfg["net"]), cfg, world_size=1)
    facts = build_run_header(cfg, world_size=1, optimizer=optimizer, iters_per_epoch=12, labeled_images=8,
                             unlabeled_images=24, val_images=5, amp_dtype=None, channels_last=False)
    text = format_run_header(facts)
    assert "× accumulate 2 = global 4 + 4; recipe 4 + 4\n" in text and "DIFFERS" not in text
    assert "× 6 optimizer steps = 12 steps" in text


def test_contrastive_memory_bank_sees_every_micro_batch(toy_root, toy_cfg, tmp_path):
    """As with N GPUs, each micro-batch enqueues its features: one accumulated step of 2 fills the
    bank with both micro-batches' entries, more than one plain step does."""
    from s4mc.engine import checkpoint

    over = {"trainer.eval_on": False, "trainer.max_iters": 1, "trainer.contrastive": {
        "num_queries": 16, "num_negatives": 8, "memory_capacity": 100000}}
    sizes = {}
    for acc in (1, 2):
        cfg = toy_cfg(toy_root, tmp_path, **over, **{"trainer.accumulate": acc})
        loop.train(cfg, name=f"acc{acc}")
        ckpt = torch.load(tmp_path / f"acc{acc}" / "checkpoints" / "latest.pth", weights_only=True)
        assert ckpt["iteration"] == 1
        state = loop.build_state(cfg, DistInfo(), iters_per_epoch=8)
        checkpoint.restore(state, ckpt, "latest.pth")
        sizes[acc] = sum(state.terms["contrastive"].memory.size(c) for c in range(6))
    assert sizes[2] > sizes[1] > 0
