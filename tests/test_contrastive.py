"""Tests for s4mc.terms.contrastive_loss (U2PL's contrastive memory-bank term, docs/method.md step 9)."""

import math

import numpy as np
import pytest
import torch

from s4mc.terms.contrastive_loss import (
    ContrastiveMemory,
    ContrastiveSettings,
    _resize_labels,
    all_gather_rows,
    contrastive_loss,
    entropy_percentiles_at,
)
from s4mc.errors import CheckpointError, ConfigError

# Small but realistic shapes: rep at 1/4 resolution, with (H - 1) = 4 * (h - 1), like 513 -> 129.
D, h, w = 16, 9, 9
H = W = 4 * (h - 1) + 1


def make_batch(num_classes, *, b_l=2, b_u=2, seed=0, labeled_ignored=False, unlabeled_ignored=False):
    """A batch where half of the pixels are confident (low entropy) and half are not."""
    g = torch.Generator().manual_seed(seed)
    b = b_l + b_u
    rep_s = torch.randn(b, D, h, w, generator=g, requires_grad=True)
    rep_t = torch.randn(b, D, h, w, generator=g, requires_grad=True)
    # Per-pixel sharpness: 6 (confident) on half of the pixels, 0.2 (uncertain) on the rest.
    sharp = torch.where(torch.rand(b, 1, H, W, generator=g) < 0.5, 6.0, 0.2)
    prob = (torch.randn(b, num_classes, H, W, generator=g) * sharp).softmax(dim=1)
    prob_l, prob_u = prob[:b_l], prob[b_l:]
    label_l = torch.randint(num_classes, (b_l, H, W), generator=g)
    label_l[:, :3] = 255  # some ignored rows, like crop padding
    if labeled_ignored:
        label_l.fill_(255)
    pseudo_u = prob_u.argmax(dim=1)
    if unlabeled_ignored:
        pseudo_u.fill_(255)
    return rep_s, rep_t, prob_l, prob_u, label_l, pseudo_u


def run(batch, memory, settings=None, *, epoch=0, epochs=10, seed=1):
    settings = settings if settings is not None else ContrastiveSettings(num_queries=32, num_negatives=8)
    gen = torch.Generator().manual_seed(seed)
    return contrastive_loss(*batch, memory, settings, epoch, epochs, generator=gen)


# --------------------------------------------------------------------------- the loss


def test_loss_finite_and_differentiable_into_student_only():
    batch = make_batch(5)
    mem = ContrastiveMemory(5, capacity=1000)
    loss, stats = run(batch, mem)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    assert stats["classes_used"].item() >= 2
    assert stats["negatives_enqueued"] > 0
    loss.backward()
    rep_s, rep_t = batch[0], batch[1]
    assert rep_s.grad is not None and rep_s.grad.abs().sum() > 0
    assert rep_t.grad is None  # the teacher only provides detached prototypes and negatives


def test_loss_weight_scales_the_returned_loss():
    mem_a, mem_b = ContrastiveMemory(4, capacity=500), ContrastiveMemory(4, capacity=500)
    base = dict(num_queries=16, num_negatives=4)
    la, sa = run(make_batch(4), mem_a, ContrastiveSettings(**base))
    lb, sb = run(make_batch(4), mem_b, ContrastiveSettings(loss_weight=0.1, **base))
    assert torch.allclose(lb, 0.1 * la)
    assert torch.allclose(sb["loss_unweighted"], sa["loss_unweighted"])


def test_labeled_pixels_alone_give_negatives():
    # The release's labeled-negative mask was always empty (U2PL issue #171); ours is not.
    batch = make_batch(5, unlabeled_ignored=True)
    mem = ContrastiveMemory(5, capacity=1000)
    loss, stats = run(batch, mem)
    assert stats["negatives_enqueued"] > 0 and loss.item() > 0


def test_two_classes_nonzero_with_unreliable_pixels():
    s = ContrastiveSettings(num_queries=32, num_negatives=8)  # release ranks 3 / 20
    assert s.ranks_for(2) == (2, 1, 2)
    assert s.ranks_for(21) == (3, 3, 20)  # no change when there are enough classes
    # Only unlabeled pixels take part, so the negatives must come from unreliable pixels.
    batch = make_batch(2, labeled_ignored=True)
    mem = ContrastiveMemory(2, capacity=1000)
    loss, stats = run(batch, mem, s)
    assert stats["unreliable_fraction"].item() > 0
    assert mem.size(0) > 0 and mem.size(1) > 0
    assert stats["classes_used"].item() == 2
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert batch[0].grad.abs().sum() > 0


def test_zero_with_graph_when_no_anchor_qualifies():
    mem = ContrastiveMemory(4, capacity=1000)
    # No probability exceeds 1.0, so no pixel can be an anchor.
    batch = make_batch(4)
    loss, stats = run(batch, mem, ContrastiveSettings(current_class_threshold=1.0, num_queries=8, num_negatives=4))
    assert loss.item() == 0.0 and stats["classes_used"].item() == 0
    loss.backward()
    assert batch[0].grad is not None and batch[0].grad.abs().sum() == 0


def test_zero_when_every_pixel_is_ignored():
    mem = ContrastiveMemory(3, capacity=100)
    batch = make_batch(3, labeled_ignored=True, unlabeled_ignored=True)
    loss, stats = run(batch, mem)
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert stats["negatives_enqueued"] == 0 and mem.sizes == [0, 0, 0]
    assert stats["entropy_low"].item() == 0.0  # no NaN leaks into the logs
    loss.backward()
    assert torch.isfinite(batch[0].grad).all()


def test_single_present_class_gives_zero_like_the_release():
    batch = list(make_batch(3))
    batch[4] = torch.full_like(batch[4], 1)  # every labeled pixel is class 1
    batch[5] = torch.full_like(batch[5], 1)  # and every pseudo-label too
    mem = ContrastiveMemory(3, capacity=1000)
    loss, stats = run(tuple(batch), mem)
    assert stats["classes_present"].item() == 1 and loss.item() == 0.0
    # All pixels are class 1, so this batch has no negatives for class 1; give the bank some
    # from "earlier batches" and lift the release's two-class minimum.
    mem2 = ContrastiveMemory(3, capacity=1000)
    mem2.push(1, torch.randn(10, D, generator=torch.Generator().manual_seed(0)))
    loss2, _ = run(tuple(batch), mem2, ContrastiveSettings(num_queries=8, num_negatives=4, min_present_classes=1))
    assert loss2.item() > 0


def test_deterministic_with_same_generator_seed():
    results = []
    for _ in range(2):
        mem = ContrastiveMemory(5, capacity=200)
        l1, _ = run(make_batch(5, seed=3), mem, seed=7)
        l2, _ = run(make_batch(5, seed=4), mem, seed=8)  # second step samples from a fuller bank
        results.append((l1.item(), l2.item(), [mem.features(c) for c in range(5)]))
    assert results[0][0] == results[1][0] and results[0][1] == results[1][1]
    for a, b in zip(results[0][2], results[1][2]):
        assert torch.equal(a, b)
    other, _ = run(make_batch(5, seed=3), ContrastiveMemory(5, capacity=200), seed=99)
    assert other.item() != results[0][0]


def test_bfloat16_autocast_keeps_fp32_math():
    batch = make_batch(4)
    rep_s = batch[0].detach().bfloat16().requires_grad_()
    rep_t = batch[1].detach().bfloat16()
    mem = ContrastiveMemory(4, capacity=500)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = run((rep_s, rep_t) + batch[2:], mem)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss.item() > 0
    assert mem.features(0).dtype == torch.float32
    loss.backward()
    assert rep_s.grad is not None and rep_s.grad.dtype == torch.bfloat16


def test_entropy_schedule():
    s = ContrastiveSettings()
    assert entropy_percentiles_at(s, 0, 80) == (20.0, 80.0)
    a, b = entropy_percentiles_at(s, 40, 80)
    assert math.isclose(a, 10.0) and math.isclose(b, 90.0)  # release: 100 - alpha_t
    assert entropy_percentiles_at(s, 80, 80) == (0.0, 100.0)


def test_labels_resized_on_the_align_corners_grid():
    lab = torch.arange(H * W).view(1, H, W)
    small = _resize_labels(lab, (h, w))
    idx = torch.arange(0, H, 4)
    assert torch.equal(small[0], lab[0][idx][:, idx])


# --------------------------------------------------------------------------- memory bank


def test_queue_fifo_capacity():
    mem = ContrastiveMemory(2, capacity=5)
    rows = torch.arange(40, dtype=torch.float32).view(20, 2)
    mem.push(0, rows[:3])
    assert mem.size(0) == 3 and torch.equal(mem.features(0), rows[:3])
    mem.push(0, rows[3:7])  # 7 rows pushed, the 2 oldest are evicted
    assert mem.size(0) == 5 and torch.equal(mem.features(0), rows[2:7])
    mem.push(0, rows[7:8])
    assert torch.equal(mem.features(0), rows[3:8])
    mem.push(0, rows[8:20])  # more than the capacity at once: only the newest 5 remain
    assert torch.equal(mem.features(0), rows[15:20])
    assert mem.size(1) == 0


def test_queue_matches_a_reference_fifo():
    g = torch.Generator().manual_seed(0)
    mem = ContrastiveMemory(3, capacity=17)
    ref = {c: [] for c in range(3)}
    counter = 0
    for _ in range(60):
        n = int(torch.randint(0, 12, (1,), generator=g))
        cls = torch.randint(0, 3, (n,), generator=g)
        feats = torch.arange(counter, counter + n, dtype=torch.float32)[:, None].repeat(1, 4)
        counter += n
        mem.enqueue(feats, cls)
        for f, c in zip(feats, cls.tolist()):
            ref[c] = (ref[c] + [f])[-17:]
    for c in range(3):
        expect = torch.stack(ref[c]) if ref[c] else torch.zeros(0, 4)
        assert torch.equal(mem.features(c), expect)


def test_gather_hook_called_once_even_without_negatives():
    calls = []

    def hook(t):
        calls.append(t.shape)
        return torch.cat([t, t])  # pretend two ranks sent the same rows

    mem = ContrastiveMemory(3, capacity=100, gather=hook)
    mem.enqueue(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert calls == [(0, 5)]
    mem.enqueue(torch.ones(3, 4), torch.tensor([0, 2, 2]))
    assert mem.sizes == [2, 0, 4]


def test_memory_state_dict_round_trip(tmp_path):
    mem = ContrastiveMemory(4, capacity=50, seed=5)
    for s in range(4):  # several steps, so that the ring buffer wraps
        run(make_batch(4, seed=s), mem, seed=s)
    assert all(n > 0 for n in mem.sizes)
    path = tmp_path / "memory.pt"
    torch.save({"contrastive_memory": mem.state_dict()}, path)
    state = torch.load(path, weights_only=True)["contrastive_memory"]
    restored = ContrastiveMemory(4, capacity=50, seed=123)
    restored.load_state_dict(state)
    assert restored.sizes == mem.sizes
    for c in range(4):
        assert torch.equal(restored.features(c), mem.features(c))
    # The bank's own generator is restored too: a resumed run continues the same stream.
    batch = make_batch(4, seed=9)
    l1, _ = contrastive_loss(*batch, mem, ContrastiveSettings(num_queries=8, num_negatives=4), 1, 10)
    l2, _ = contrastive_loss(*batch, restored, ContrastiveSettings(num_queries=8, num_negatives=4), 1, 10)
    assert l1.item() == l2.item()


def test_memory_load_rejects_other_class_count():
    mem = ContrastiveMemory(3, capacity=10)
    mem.push(0, torch.ones(2, 4))
    with pytest.raises(CheckpointError, match="3 classes"):
        ContrastiveMemory(5, capacity=10).load_state_dict(mem.state_dict())


def test_all_gather_rows_single_process_group(tmp_path):
    import torch.distributed as dist

    x = torch.arange(6.0).view(3, 2)
    assert all_gather_rows(x) is x  # not initialised: identity
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert torch.equal(all_gather_rows(x), x)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- settings


def test_settings_from_config_release_block():
    block = {
        "loss_weight": 1.0, "negative_high_entropy": True, "low_rank": 3, "high_rank": 20,
        "current_class_threshold": 0.3, "current_class_negative_threshold": 1,
        "unsupervised_entropy_ignore": 80, "low_entropy_threshold": 20,
        "num_negatives": 50, "num_queries": 256, "temperature": 0.5,
    }
    s = ContrastiveSettings.from_config(block)
    assert s == ContrastiveSettings()


@pytest.mark.parametrize(
    "block, match",
    [
        ({"num_queris": 3}, "unknown key 'trainer.contrastive.num_queris'"),
        ({"binary": True}, "binary"),
        ({"low_rank": "three"}, "low_rank' must be int"),
        ({"high_rank": 2}, "high_rank.* must be greater than low_rank"),
        ({"temperature": 0}, "temperature' = 0.0 must lie in"),
        ({"negative_high_entropy": 1}, "negative_high_entropy' must be bool"),
        ({"current_class_threshold": 1.5}, "current_class_threshold' = 1.5 must lie in \\[0, 1\\]"),
    ],
)
def test_the_schema_checks_the_contrastive_block(block, match, toy_root, toy_cfg, tmp_path):
    """Defaults, types and bounds live in s4mc/config.py's schema alone; the loader reads validated values."""
    with pytest.raises(ConfigError, match=match):
        toy_cfg(toy_root, tmp_path, **{"trainer.contrastive": block})
    with pytest.raises(ConfigError, match=match.replace("trainer.contrastive", "trainer.terms.contrastive")):
        toy_cfg(toy_root, tmp_path, **{"trainer.terms": {"contrastive": block}})
