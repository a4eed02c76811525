"""Tests for s4mc.pseudo_label (docs/method.md steps 5-8) and s4mc.data.priors."""
import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from s4mc import diagnostics, pseudo_label
from s4mc.pseudo_label import keep_percent_at
from s4mc.errors import ConfigError
from s4mc.data.priors import PRIORS, resolve_prior

# Measured from the original release; provenance in tests/data/README.md.
DATA = Path(__file__).resolve().parent / "data"
CASES_FILE = DATA / "s4mc_loss_cases_subset.pt"
PRIORS_FILE = DATA / "s4mc_neighbor_priors.json"


@functools.lru_cache(maxsize=1)
def _cases():
    return torch.load(CASES_FILE, weights_only=True)["cases"]


def test_release_cases_cover_every_setting():
    cases = _cases()
    indicators = ("margin", "confidence", "entropy")
    pairs = lambda key: {(c["indicator"], c[key]) for c in cases}  # noqa: E731
    assert pairs("neighbors") == {(i, n) for i in indicators for n in (4, 8)}
    assert pairs("k") == {(i, k) for i in indicators for k in (1, 2, 3)}
    assert pairs("dataset") == {(i, d) for i in indicators for d in ("pascal", "cityscapes")}
    assert {c["keep_percent"] for c in cases} == {60.0, 73.5, 80.0, 95.0, 100.0}


def _random_case(seed, batch=2, classes=5, height=12, width=14, ignore=0.1):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(batch, classes, height, width, generator=g) * 3
    student = torch.randn(batch, classes, height, width, generator=g)
    label = teacher.argmax(1)
    label[torch.rand(batch, height, width, generator=g) < ignore] = 255
    return student, teacher, label


# ---------------------------------------------------------------- golden cases of the release

@pytest.mark.parametrize("index", range(12))
def test_matches_release_case(index):
    case = _cases()[index]
    prior = resolve_prior("auto", case["teacher_logits"].shape[1], case["dataset"])
    options = dict(indicator=case["indicator"], neighbors=case["neighbors"], k=case["k"], prior=prior)

    refined = pseudo_label.refine(torch.softmax(case["teacher_logits"], 1), case["neighbors"], case["k"], prior)
    torch.testing.assert_close(refined, case["refined_prob"], atol=1e-6, rtol=0)

    target, stats = pseudo_label.pseudo_label_target(case["teacher_logits"], case["pseudo_label"],
                                               case["keep_percent"], **options)
    gamma = float(case["threshold"])
    assert stats["threshold"].dtype == torch.float64
    assert float(stats["threshold"]) == pytest.approx(gamma, rel=1e-6)
    near = (pseudo_label.indicator_map(refined, case["indicator"]).double() - gamma).abs() <= 1e-6
    assert torch.equal(target[~near], case["target_after"][~near])

    loss, _, _ = pseudo_label.pseudo_label_loss(case["student_logits"], case["teacher_logits"], case["pseudo_label"],
                                       case["keep_percent"], **options)
    assert float(loss) == pytest.approx(float(case["loss"]), rel=1e-5)


def test_prior_tables_equal_reference():
    reference = json.loads(PRIORS_FILE.read_text())
    for name in ("pascal", "cityscapes"):
        assert PRIORS[name] == reference[name]
    assert len(PRIORS["pascal"]) == 21 and len(PRIORS["cityscapes"]) == 19


# ---------------------------------------------------------------- indicator

@pytest.mark.parametrize("ties", [False, True])
def test_margin_equals_sorted_top2_difference(ties):
    g = torch.Generator().manual_seed(3)
    prob = torch.rand(2, 6, 5, 7, generator=g)
    if ties:
        prob = prob.mul(4).round().div(4)  # many exact ties, including for the maximum
    top2 = prob.sort(dim=1, descending=True).values[:, :2]
    expected = top2[:, 0] - top2[:, 1]
    got = pseudo_label.indicator_map(prob, "margin")
    assert torch.equal(got, expected)
    if ties:
        assert (expected == 0).any()  # the case a masked second maximum would get wrong


# ---------------------------------------------------------------- threshold

@pytest.mark.parametrize("seed", range(6))
def test_threshold_equals_numpy_percentile(seed, percentile_path):
    g = torch.Generator().manual_seed(seed)
    size = (2, 7, 9) if seed % 2 else (1, 1, 3)
    values = torch.rand(size, generator=g, dtype=torch.float64)
    if seed == 4:
        values = values.round(decimals=1)  # ties
    valid = torch.rand(size, generator=g) < 0.7
    valid.view(-1)[0] = True
    for percent in (0.0, 12.5, 40.0, 50.0, 73.3, 99.9, 100.0):
        expected = np.percentile(values[valid].numpy(), percent)
        got = pseudo_label.threshold(values, valid, percent)
        assert got.dtype == torch.float64 and got.dim() == 0
        assert float(got) == pytest.approx(float(expected), rel=1e-12, abs=1e-15)


def test_threshold_of_float32_map_and_empty_mask(percentile_path):
    values = torch.rand(3, 4, 5)
    valid = torch.ones(3, 4, 5, dtype=torch.bool)
    expected = np.percentile(values.numpy().astype(np.float64), 40)
    assert float(pseudo_label.threshold(values, valid, 40)) == pytest.approx(expected, rel=1e-12)
    assert float(pseudo_label.threshold(values, torch.zeros_like(valid), 40)) == 0.0


@pytest.mark.slow
def test_threshold_above_quantile_size_limit(percentile_path):
    g = torch.Generator().manual_seed(0)
    values = torch.rand(2**24 + 1000, generator=g)
    valid = torch.ones(values.shape, dtype=torch.bool)
    valid[:500] = False
    got = pseudo_label.threshold(values, valid, 37.5)
    expected = np.percentile(values.numpy()[500:].astype(np.float64), 37.5)
    assert float(got) == pytest.approx(float(expected), rel=1e-12)


# ---------------------------------------------------------------- refinement

def _refine_by_loops(prob, neighbors, k, prior):
    """Direct per-pixel transcription of docs/method.md step 6, for comparison."""
    b, c, h, w = prob.shape
    offsets = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if neighbors == 8:
        offsets += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    out = prob.clone().double()
    for n in range(b):
        for cls in range(c):
            e = 0.0 if prior is None else float(prior[cls])
            for y in range(h):
                for x in range(w):
                    qs = [float(prob[n, cls, y + dy, x + dx]) if 0 <= y + dy < h and 0 <= x + dx < w else 0.0
                          for dy, dx in offsets]
                    p = float(prob[n, cls, y, x])
                    for q in sorted(qs, reverse=True)[:k]:
                        p = p + math.exp(-0.5) * q - math.exp(-0.5) * max(p * q, p * e)
                    out[n, cls, y, x] = p
    return out


@pytest.mark.parametrize("neighbors,k,with_prior", [(4, 1, True), (4, 3, False), (8, 2, True), (8, 8, True)])
def test_refine_matches_direct_transcription(neighbors, k, with_prior):
    prob = torch.softmax(torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(k)), 1)
    prior = torch.tensor([0.9, 0.2, 0.5]) if with_prior else None
    expected = _refine_by_loops(prob, neighbors, k, prior)
    torch.testing.assert_close(pseudo_label.refine(prob, neighbors, k, prior).double(), expected,
                               atol=1e-6, rtol=0)


def test_constant_map_refined_identically_away_from_borders():
    prob = torch.full((1, 4, 9, 10), 0.25)
    for neighbors in (4, 8):
        refined = pseudo_label.refine(prob, neighbors, neighbors, torch.tensor([0.1, 0.5, 0.9, 1.0]))
        inner = refined[..., 1:-1, 1:-1]
        assert torch.equal(inner, inner[..., :1, :1].expand_as(inner))
        assert not torch.equal(refined[..., 0, 0], inner[..., 0, 0])  # zero padding: a corner lacks neighbours
    assert pseudo_label.refine(prob.double()).dtype == torch.float64


def test_margin_gain_where_neighbours_agree():
    # docs/method.md, "The toy study": where every neighbour equals the pixel, k = 1 refines the
    # margin to margin * (1 + beta * (1 - p1 - p2)); a pixel whose doubt lies between its top two
    # classes gains nothing, one whose doubt is spread over other classes gains.
    rows = torch.tensor([[0.6, 0.4, 0.0, 0.0], [0.5, 0.2, 0.2, 0.1], [0.3, 0.25, 0.25, 0.2]], dtype=torch.float64)
    prob = rows.view(3, 4, 1, 1).expand(3, 4, 5, 5).contiguous()
    refined = pseudo_label.indicator_map(pseudo_label.refine(prob, neighbors=8), "margin")[:, 2, 2]
    p1, p2 = rows[:, 0], rows[:, 1]
    assert torch.allclose(refined, (p1 - p2) * (1 + pseudo_label.BETA * (1 - p1 - p2)), atol=1e-12, rtol=0)
    assert refined[0] == pytest.approx(0.2) and refined[1] > 0.3 and refined[2] > 0.05


def test_refine_off_is_identity_on_the_mask():
    student, teacher, label = _random_case(1)
    target, stats = pseudo_label.pseudo_label_target(teacher, label, 70.0, refine=False)
    margin = pseudo_label.indicator_map(torch.softmax(teacher, 1), "margin").double()
    expected = torch.where((label != 255) & (margin > stats["threshold"]), label, 255)
    assert torch.equal(target, expected)
    assert stats["kept_fraction"] == stats["kept_fraction_unrefined"]
    assert int(stats["flipped_to_keep"]) == 0 and int(stats["flipped_to_drop"]) == 0


# ---------------------------------------------------------------- mask, loss, diagnostics

@pytest.mark.parametrize("indicator", pseudo_label.INDICATORS)
@pytest.mark.parametrize("keep", [60.0, 80.0, 95.0])
def test_kept_fraction_follows_keep_percent_without_refinement(indicator, keep):
    _, teacher, label = _random_case(2, batch=2, height=20, width=25)
    _, stats = pseudo_label.pseudo_label_target(teacher, label, keep, indicator=indicator, refine=False)
    n_valid = int((label != 255).sum())
    assert abs(float(stats["kept_fraction"]) * n_valid - keep / 100 * n_valid) <= 1.0


def test_loss_is_u2pl_scaled_cross_entropy():
    student, teacher, label = _random_case(3)
    loss, _, _ = pseudo_label.pseudo_label_loss(student, teacher, label, 70.0, indicator="entropy", neighbors=8, k=2)
    target, _ = pseudo_label.pseudo_label_target(teacher, label, 70.0, indicator="entropy", neighbors=8, k=2)
    kept = int((target != 255).sum())
    expected = target.numel() / kept * F.cross_entropy(student, target, ignore_index=255)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_nothing_kept_gives_zero_loss_with_finite_gradient():
    student, teacher, label = _random_case(4)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss, _, stats = pseudo_label.pseudo_label_loss(student, teacher, label, 0.0, refine=False)
    assert float(stats["kept_fraction"]) == 0.0
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.isfinite(student.grad).all() and teacher.grad is None


def test_gradient_reaches_student_only():
    student, teacher, label = _random_case(5)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss, _, stats = pseudo_label.pseudo_label_loss(student, teacher, label, 80.0)
    loss.backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    assert all(not v.requires_grad for v in stats.values())


def test_half_precision_inputs_give_full_precision_results():
    student, teacher, label = _random_case(6)
    ground_truth = label.clone()
    loss, _, stats = pseudo_label.pseudo_label_loss(student.bfloat16(), teacher.bfloat16(), label, 80.0,
                                           ground_truth=ground_truth)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert stats["threshold"].dtype == torch.float64
    for name in ("kept_fraction", "kept_fraction_unrefined", "kept_accuracy", "kept_accuracy_unrefined"):
        assert stats[name].dtype == torch.float64 and stats[name].dim() == 0
    assert pseudo_label.refine(torch.softmax(teacher, 1).half()).dtype == torch.float32


def test_diagnostics_on_a_known_case():
    # One row of 6 pixels, 2 classes; the last pixel is ignored but still a neighbour.
    prob0 = torch.tensor([0.95, 0.58, 0.7, 0.62, 0.1, 0.45])
    teacher = torch.log(torch.stack([prob0, 1 - prob0])).view(1, 2, 1, 6)
    label = torch.tensor([[[0, 0, 0, 0, 1, 255]]])
    gt = torch.tensor([[[0, 1, 0, 255, 0, 1]]])
    # Unrefined margins .9 .16 .4 .24 .8 -> gamma = percentile(., 20) = .16 + .8 * (.24 - .16).
    gamma = 0.16 + 0.8 * 0.08
    refined = _refine_by_loops(torch.softmax(teacher, 1), 4, 1, None)[0, :, 0]
    refined_margin = (refined[0] - refined[1]).abs()
    torch.testing.assert_close(refined_margin[:5], torch.tensor([0.6756, 0.2965, 0.3345, 0.0629, 0.4949],
                                                                dtype=torch.float64), atol=1e-4, rtol=0)
    # So refinement keeps pixel 1 (.16 -> .30 > gamma) and drops pixel 3 (.24 -> .06).
    target, stats = pseudo_label.pseudo_label_target(teacher, label, 80.0, ground_truth=gt)
    assert float(stats["threshold"]) == pytest.approx(gamma, rel=1e-6)
    assert target.tolist() == [[[0, 0, 0, 255, 1, 255]]]
    assert float(stats["kept_fraction"]) == pytest.approx(4 / 5)
    assert float(stats["kept_fraction_unrefined"]) == pytest.approx(4 / 5)
    assert int(stats["flipped_to_keep"]) == 1 and int(stats["flipped_to_drop"]) == 1
    assert float(stats["flipped_fraction"]) == pytest.approx(2 / 5)
    # Kept with gt: refined {0, 1, 2, 4} -> right at 0 and 2; unrefined {0, 2, 4} -> right at 0 and 2.
    assert float(stats["kept_accuracy"]) == pytest.approx(2 / 4)
    assert float(stats["kept_accuracy_unrefined"]) == pytest.approx(2 / 3)
    # The threshold alone, moved to keep 4 pixels too, keeps the top-4 unrefined margins {0, 4, 2, 3}:
    # with gt at 0, 4 and 2, right at 0 and 2.
    assert float(stats["kept_accuracy_same_share"]) == pytest.approx(2 / 3)
    _, baseline = pseudo_label.pseudo_label_target(teacher, label, 80.0, refine=False, ground_truth=gt)
    assert float(baseline["kept_accuracy"]) == pytest.approx(2 / 3)
    assert "kept_accuracy_same_share" not in baseline  # nothing to compare without refinement


@pytest.mark.parametrize("low_is_reliable", [False, True])
def test_same_share_accuracy_ranks_by_the_unrefined_indicator(low_is_reliable):
    g = torch.Generator().manual_seed(3)
    raw = torch.rand(2, 9, 11, generator=g)
    valid = torch.rand(2, 9, 11, generator=g) > 0.2
    labelled = torch.rand(2, 9, 11, generator=g) > 0.1
    right = labelled & (torch.rand(2, 9, 11, generator=g) > 0.4)
    order = np.argsort(raw[valid].numpy() if low_is_reliable else -raw[valid].numpy(), kind="stable")
    for kept in (1, 17, int(valid.sum())):
        top = order[:kept]
        expected = right[valid].numpy()[top].sum() / labelled[valid].numpy()[top].sum()
        got = diagnostics.same_share_accuracy(raw, valid, torch.tensor(float(kept)), right, labelled, low_is_reliable)
        assert got.dtype == torch.float64 and float(got) == pytest.approx(expected)
    nothing = diagnostics.same_share_accuracy(raw, valid, torch.tensor(0.0), right, labelled, low_is_reliable)
    assert float(nothing) == 0.0


# ---------------------------------------------------------------- schedule and errors

def test_keep_percent_schedule():
    assert keep_percent_at(0, 80) == 60.0
    assert keep_percent_at(40, 80) == pytest.approx(80.0)
    assert keep_percent_at(80, 80) == 100.0
    assert keep_percent_at(1, 80, 60.0, iteration=50, iters_per_epoch=100) == pytest.approx(
        100 - 40 * (1 - 1.5 / 80))


def test_mismatched_tensors_name_their_shapes():
    """Settings are checked once, by the config schema (tests/test_config.py); the functions
    check only what a config cannot: the tensors they are given."""
    student, teacher, label = _random_case(7)
    with pytest.raises(ConfigError, match="prior"):
        pseudo_label.pseudo_label_loss(student, teacher, label, 80.0, prior=torch.ones(4))
    with pytest.raises(ValueError, match="differ in shape"):
        pseudo_label.pseudo_label_loss(student[:, :3], teacher, label, 80.0)
    with pytest.raises(ValueError, match="pseudo-label"):
        pseudo_label.pseudo_label_loss(student, teacher, label[:, :5], 80.0)
    with pytest.raises(ValueError, match="ground truth"):
        pseudo_label.pseudo_label_loss(student, teacher, label, 80.0, ground_truth=label[:, :5])


def test_resolve_prior(tmp_path):
    assert torch.equal(resolve_prior("auto", 21, "pascal"), torch.tensor(PRIORS["pascal"]))
    assert torch.equal(resolve_prior("cityscapes", 19, "custom"), torch.tensor(PRIORS["cityscapes"]))
    assert resolve_prior("auto", 3, "toy") is None
    assert resolve_prior("none", 3, "pascal") is None and resolve_prior(None, 3, "pascal") is None
    assert resolve_prior([0.5, 1.0], 2, "toy").tolist() == [0.5, 1.0]
    listed = tmp_path / "list.json"
    listed.write_text("[0.1, 0.2, 0.3]")
    assert resolve_prior(str(listed), 3, "toy").tolist() == pytest.approx([0.1, 0.2, 0.3])
    keyed = tmp_path / "keyed.json"
    keyed.write_text(json.dumps({"toy": [0.4, 0.6], "prior": [0.0, 0.0]}))
    assert resolve_prior(keyed, 2, "toy").tolist() == pytest.approx([0.4, 0.6])
    assert resolve_prior(keyed, 2, "custom").tolist() == [0.0, 0.0]
    with pytest.raises(ConfigError, match="list.json"):
        resolve_prior(str(listed), 4, "toy")
    with pytest.raises(ConfigError, match="pascal"):
        resolve_prior("pascal", 19, "cityscapes")
    with pytest.raises(ConfigError, match="outside"):
        resolve_prior([0.5, 1.5], 2, "toy")
    with pytest.raises(ConfigError, match="missing.json"):
        resolve_prior(str(tmp_path / "missing.json"), 2, "toy")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_cuda():
    student, teacher, label = (t.cuda() for t in _random_case(8, batch=2, height=64, width=64))
    prior = torch.rand(5, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _, stats = pseudo_label.pseudo_label_loss(student.requires_grad_(True), teacher, label, 80.0,
                                               neighbors=8, k=2, prior=prior, ground_truth=label)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu_loss, _, cpu_stats = pseudo_label.pseudo_label_loss(student.detach().cpu(), teacher.cpu(), label.cpu(), 80.0,
                                                   neighbors=8, k=2, prior=prior.cpu(), ground_truth=label.cpu())
    assert float(loss.detach()) == pytest.approx(float(cpu_loss), rel=1e-5)
    assert float(stats["threshold"]) == pytest.approx(float(cpu_stats["threshold"]), rel=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_threshold_on_cuda_above_quantile_size_limit():
    g = torch.Generator().manual_seed(1)
    values = torch.rand(2**24 + 1000, generator=g)
    valid = torch.rand(values.shape, generator=g) < 0.9
    values_cuda, valid_cuda = values.cuda(), valid.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = pseudo_label.threshold(values_cuda, valid_cuda, 62.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = np.percentile(values[valid].numpy().astype(np.float64), 62.5)
    assert got.device.type == "cuda" and float(got) == pytest.approx(float(expected), rel=1e-12)
