"""`release_exact` in s4mc.terms.contrastive_loss: each of the four U2PL behaviours the S4MC release
computed with, in both modes, on inputs small enough to write the expected masks,
banks and losses down by hand (docs/method.md, step 9)."""

import math

import pytest
import torch

from s4mc.terms.contrastive_loss import ContrastiveMemory, ContrastiveSettings, contrastive_loss, entropy_percentiles_at


def settings(release_exact, **kw):
    base = dict(num_queries=4, num_negatives=3, temperature=0.5, negative_high_entropy=False)
    base.update(kw)
    return ContrastiveSettings(release_exact=release_exact, **base)


def image(*pixels):
    """Per-pixel class probabilities of a 1 x len(pixels) image -> [1, C, 1, W]."""
    return torch.tensor(pixels, dtype=torch.float32).t().reshape(1, len(pixels[0]), 1, len(pixels))


def bank_rows(memory, c):
    """Which pixels a queue holds: teacher features are one-hot per pixel, so argmax = pixel."""
    return memory.features(c).argmax(dim=1).tolist()


def run(batch, memory, s, *, world_size=None):
    rep_s, rep_t, prob_l, prob_u, label_l, pseudo_u = batch
    return contrastive_loss(rep_s, rep_t, prob_l, prob_u, label_l, pseudo_u, memory, s, 0, 10,
                            generator=torch.Generator().manual_seed(0), world_size=world_size)


# --------------------------------------------------------------------------- 1. negatives

def negatives_batch():
    """C=4; pixels (flat order) L0, L1 labeled, U0, U1 unlabeled; teacher feature of pixel p = e_p.

    L0: label 0, ranks 0,1,2,3 (class order)  -> corrected: negative for class 1 (rank 1 < 2, not its label)
    L1: label 3, ranks 3,2,1,0                -> corrected: negative for class 2
    U0: pseudo 0, ranks 0,1,2,3               -> corrected: classes 2, 3 (rank in [2, 4), not its label)
    U1: pseudo 1, ranks 0,3,2,1               -> corrected: class 2; release: class 1 (its own label, rank 3)
    """
    prob_l = image([0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4])
    prob_u = image([0.4, 0.3, 0.2, 0.1], [0.4, 0.1, 0.2, 0.3])
    label_l = torch.tensor([[[0, 3]]])
    pseudo_u = torch.tensor([[[0, 1]]])
    rep_t = torch.eye(4).reshape(2, 2, 4).permute(0, 2, 1).unsqueeze(2)  # [b, D, 1, x]: pixel 2b+x -> e_p
    rep_s = torch.randn(2, 4, 1, 2, generator=torch.Generator().manual_seed(1), requires_grad=True)
    return rep_s, rep_t, prob_l, prob_u, label_l, pseudo_u


def test_teacher_features_identify_pixels():
    rep_t = negatives_batch()[1]
    flat = rep_t.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(flat, torch.eye(4))


@pytest.mark.parametrize("release_exact, expected", [
    (False, {0: [], 1: [0], 2: [1, 2, 3], 3: [2]}),
    (True, {0: [], 1: [3], 2: [], 3: []}),
])
def test_negative_masks(release_exact, expected):
    memory = ContrastiveMemory(4, capacity=100)
    run(negatives_batch(), memory, settings(release_exact, low_rank=2, high_rank=4))
    assert {c: bank_rows(memory, c) for c in range(4)} == expected


# --------------------------------------------------------------------------- 2. anchor indexing

T, K = 0.5, 3


def info_nce(anchor, positive, negative):
    """One anchor's loss with K copies of one negative, as the term computes it."""
    cos = torch.nn.functional.cosine_similarity
    pos, neg = float(cos(anchor, positive, dim=0)) / T, float(cos(anchor, negative, dim=0)) / T
    return math.log(math.exp(pos) + K * math.exp(neg)) - pos


def anchors_batch():
    """C=3, one labeled 1x3 image labeled [1, 2, 2], no valid unlabeled pixel.

    Classes present: 1 and 2 (class 0 is absent). Student features a1, a2, a2 (one anchor
    per class, so every drawn anchor is the same vector); teacher features t1, t2, t2, so
    the prototypes are t1 and t2. No pixel becomes a negative this step
    (current_class_negative_threshold 0), so the banks hold only what the test put there.
    """
    a1, a2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    t1, t2 = torch.tensor([0.6, 0.8, 0.0]), torch.tensor([0.0, 0.6, 0.8])
    rep_s = torch.stack([a1, a2, a2], 1).reshape(1, 3, 1, 3)
    rep_t = torch.stack([t1, t2, t2], 1).reshape(1, 3, 1, 3)
    rep_s = torch.cat([rep_s, torch.zeros(1, 3, 1, 3)]).requires_grad_(True)
    rep_t = torch.cat([rep_t, torch.zeros(1, 3, 1, 3)])
    prob_l = image([0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.1, 0.1, 0.8])
    prob_u = image([0.4, 0.3, 0.3], [0.4, 0.3, 0.3], [0.4, 0.3, 0.3])
    label_l = torch.tensor([[[1, 2, 2]]])
    pseudo_u = torch.full((1, 1, 3), 255)
    return (rep_s, rep_t, prob_l, prob_u, label_l, pseudo_u), (a1, a2, t1, t2)


def filled_memory():
    n0, n1, n2 = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 0.0]), torch.tensor([-1.0, 0.0, 1.0])
    memory = ContrastiveMemory(3, capacity=10)
    for c, n in enumerate((n0, n1, n2)):
        memory.push(c, n[None])
    return memory, (n0, n1, n2)


@pytest.mark.parametrize("release_exact", [False, True])
def test_anchor_positive_and_bank_classes(release_exact):
    batch, (a1, a2, t1, t2) = anchors_batch()
    memory, (n0, n1, n2) = filled_memory()
    s = settings(release_exact, current_class_negative_threshold=0.0)
    loss, stats = run(batch, memory, s)
    assert [memory.size(c) for c in range(3)] == [1, 1, 1]  # nothing enqueued
    if release_exact:
        # Present classes v = [1, 2]. j = 0: class 0 has no anchor, skipped. j = 1: anchors and
        # positive of class 1, negatives from the bank of v_1 = 2. Divided by the 2 classes present.
        expected = info_nce(a1, t1, n2) / 2
    else:
        expected = (info_nce(a1, t1, n1) + info_nce(a2, t2, n2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert int(stats["classes_present"]) == 2


# --------------------------------------------------------------------------- 3. rank clamping

def two_class_batch():
    """C=2, low_rank 3: one labeled pixel (label 0) and one unlabeled pixel (pseudo 0), both p = [0.7, 0.3]."""
    prob = image([0.7, 0.3])
    rep_t = torch.eye(2).reshape(2, 2, 1, 1)
    rep_s = torch.randn(2, 2, 1, 1, generator=torch.Generator().manual_seed(2), requires_grad=True)
    return rep_s, rep_t, prob, prob.clone(), torch.zeros(1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1, dtype=torch.long)


@pytest.mark.parametrize("release_exact, ranks, bank1", [
    (False, (2, 1, 2), [0, 1]),  # clamped: class 1 (rank 1) is a negative of both pixels
    (True, (3, 3, 20), []),      # as configured: rank 1 is never in [3, 20), the bank stays empty
])
def test_rank_clamping(release_exact, ranks, bank1):
    s = settings(release_exact, low_rank=3, high_rank=20)
    assert s.ranks_for(2) == ranks
    memory = ContrastiveMemory(2, capacity=10)
    loss, _ = run(two_class_batch(), memory, s)
    assert bank_rows(memory, 1) == bank1 and memory.size(0) == 0
    if release_exact:
        assert loss.item() == 0.0  # with empty banks the release's term is 0 on 2-class tasks


# --------------------------------------------------------------------------- 4. world size

@pytest.mark.parametrize("release_exact", [False, True])
def test_world_size_division(release_exact):
    s = settings(release_exact, current_class_negative_threshold=0.0)
    results = {}
    for world in (1, 4):
        batch, _ = anchors_batch()
        memory, _ = filled_memory()
        loss, _ = run(batch, memory, s, world_size=world)
        loss.backward()
        results[world] = (loss.item(), batch[0].grad.clone())
    scale = 0.25 if release_exact else 1.0
    assert results[4][0] == pytest.approx(scale * results[1][0], rel=1e-6)
    assert torch.allclose(results[4][1], scale * results[1][1], atol=1e-7)
    assert results[1][0] > 0


def test_release_exact_unreliable_percentile_ignores_the_key():
    # The release hard-coded 100 - alpha_t; the corrected term reads unsupervised_entropy_ignore.
    kw = dict(low_entropy_threshold=20.0, unsupervised_entropy_ignore=70.0)
    assert entropy_percentiles_at(ContrastiveSettings(**kw), 0, 10) == (20.0, 70.0)
    assert entropy_percentiles_at(ContrastiveSettings(release_exact=True, **kw), 0, 10) == (20.0, 80.0)


def test_release_exact_comes_from_the_config_block():
    assert ContrastiveSettings.from_config({"release_exact": True}).release_exact is True
    assert ContrastiveSettings.from_config({}).release_exact is False
