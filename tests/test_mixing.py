"""Tests for s4mc.mixing (docs/method.md step 2)."""
import pytest
import torch

from s4mc.errors import ConfigError
from s4mc.mixing import apply_mix, mix, sample_mix_mask

B, H, W = 4, 21, 30


def _encoded_batch(batch=B, offset=0):
    """Images whose pixels spell (sample, y, x) and labels that encode the same triple."""
    n = torch.arange(batch).view(batch, 1, 1).expand(batch, H, W) + offset
    y = torch.arange(H).view(1, H, 1).expand(batch, H, W)
    x = torch.arange(W).view(1, 1, W).expand(batch, H, W)
    image = torch.stack([n, y, x], 1).float() + 1  # +1 keeps 0 free for "erased"
    label = (n * H + y) * W + x
    return image, label


def _decode(image):
    n, y, x = (image - 1).round().long().unbind(1)
    return (n * H + y) * W + x


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("mode", ["cutmix", "classmix"])
def test_mixing_keeps_image_and_label_aligned(mode):
    image, label = _encoded_batch()
    # ClassMix chooses classes from a pseudo-label: give it blocks of several classes.
    pseudo = (torch.arange(W).view(1, 1, W) // 7 + torch.arange(B).view(B, 1, 1)).expand(B, H, W) % 5
    mask = sample_mix_mask(B, H, W, mode=mode, prob=1.0, generator=_generator(), pseudo_label=pseudo)
    mixed_image, mixed_label, mixed_pseudo = (mix(mode, mask, x) for x in (image, label, pseudo))
    assert torch.equal(_decode(mixed_image), mixed_label)
    sample = _decode(mixed_image) // (H * W)
    expected_sample = torch.where(mask, (torch.arange(B).view(B, 1, 1) + 1) % B, torch.arange(B).view(B, 1, 1))
    assert torch.equal(sample, expected_sample)  # sample i takes from (i+1) mod B, nothing else
    assert (sample != torch.arange(B).view(B, 1, 1)).any(dim=(1, 2)).all()  # every sample was mixed
    assert torch.equal(mixed_pseudo, torch.where(mask, pseudo.roll(-1, 0), pseudo))
    if mode == "classmix":
        # Pasted pixels are whole classes of the partner's pseudo-label: half of them.
        for i in range(B):
            partner = pseudo[(i + 1) % B]
            pasted = set(partner[mask[i]].tolist())
            assert len(pasted) == len(set(partner.unique().tolist())) // 2
            for c in pasted:
                assert mask[i][partner == c].all()


def test_cutout_erases_image_and_label_together():
    image, label = _encoded_batch()
    mask = sample_mix_mask(B, H, W, mode="cutout", prob=1.0, generator=_generator())
    mixed_image, mixed_label = mix("cutout", mask, image, fill=0.0), mix("cutout", mask, label, fill=255)
    erased = (mixed_image == 0).all(1)
    assert torch.equal(erased, mask) and torch.equal(mixed_label == 255, mask)
    assert torch.equal(_decode(mixed_image)[~mask], label[~mask])


def test_box_covers_half_the_image():
    for seed in range(20):
        mask = sample_mix_mask(B, H, W, mode="cutmix", prob=1.0, generator=_generator(seed))
        area = mask.sum(dim=(1, 2)).float()
        box_w = mask.any(1).sum(1)
        assert ((box_w > W / 2) & (box_w < W)).all()
        # h = round(H*W/2/w) can be off by half a row of the box width.
        assert ((area - H * W / 2).abs() <= box_w / 2).all()
        for i in range(B):  # a single rectangle
            rows, cols = mask[i].any(1), mask[i].any(0)
            assert int(mask[i].sum()) == int(rows.sum()) * int(cols.sum())


def test_probability_gates_samples():
    masks = sample_mix_mask(400, 8, 8, mode="cutmix", prob=0.5, generator=_generator(), gate="sample")
    mixed = masks.any(dim=(1, 2))
    assert 0.4 < float(mixed.float().mean()) < 0.6
    assert mixed.any() and not mixed.all()  # one batch holds mixed and unmixed samples
    assert not sample_mix_mask(8, 8, 8, mode="cutmix", prob=0.0, generator=_generator()).any()
    assert not sample_mix_mask(8, 8, 8, mode="none", prob=1.0, generator=_generator()).any()


def test_batch_of_one_needs_a_partner():
    image, label = _encoded_batch(batch=1)
    mask = sample_mix_mask(1, H, W, mode="cutmix", prob=1.0, generator=_generator())
    with pytest.raises(ValueError, match="batch of 1"):
        apply_mix(image, mask)
    with pytest.raises(ValueError, match="batch of 1"):
        sample_mix_mask(1, H, W, mode="classmix", prob=1.0, generator=_generator(), pseudo_label=label % 3)
    partner_image, partner_label = _encoded_batch(batch=1, offset=1)
    mixed_image, mixed_label = mix("cutmix", mask, image, partner_image), mix("cutmix", mask, label, partner_label)
    assert torch.equal(_decode(mixed_image), mixed_label)
    assert torch.equal(mixed_label // (H * W) == 1, mask)
    classmix = sample_mix_mask(1, H, W, mode="classmix", prob=1.0, generator=_generator(),
                               partner_label=torch.arange(W).expand(1, H, W) // 10)
    assert int(classmix.sum()) == H * 10  # one of three column bands


def test_generator_determinism_and_seed_dependence():
    def sample(seed):
        return sample_mix_mask(B, H, W, mode="cutmix", prob=1.0, generator=_generator(seed))

    assert torch.equal(sample(3), sample(3))
    assert not torch.equal(sample(3), sample(4))
    state = torch.random.get_rng_state()
    sample(5)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched


def test_bad_input_is_named():
    with pytest.raises(ConfigError, match="'mixup'"):
        sample_mix_mask(B, H, W, mode="mixup", prob=1.0, generator=_generator())
    with pytest.raises(ValueError, match="Generator"):
        sample_mix_mask(B, H, W, mode="cutmix", prob=1.0, generator=None)
    image, _ = _encoded_batch()
    with pytest.raises(ValueError, match="does not fit"):
        apply_mix(image, torch.zeros(B, H, W + 1, dtype=torch.bool))


@pytest.mark.parametrize("mode", ["cutmix", "classmix"])
def test_batch_gate_mixes_all_or_none(mode):
    # The release's gate: one coin per step, so the samples of a step always agree.
    gen = _generator(3)
    pseudo = torch.arange(8 * 8).view(1, 8, 8).repeat(4, 1, 1) % 4  # 4 classes in every sample
    mixed_steps = 0
    for _ in range(400):
        mask = sample_mix_mask(4, 8, 8, mode=mode, prob=0.5, generator=gen, pseudo_label=pseudo)
        per_sample = mask.any(dim=(1, 2))
        assert per_sample.all() or not per_sample.any()
        mixed_steps += int(per_sample.all())
    assert 0.42 < mixed_steps / 400 < 0.58


def test_sample_gate_share_of_mixed_steps():
    # Per-sample coins: with 4 samples a step is untouched only with probability 1/16.
    gen = _generator(4)
    steps = [sample_mix_mask(4, 8, 8, mode="cutmix", prob=0.5, generator=gen, gate="sample").any(dim=(1, 2))
             for _ in range(400)]
    touched = sum(bool(s.any()) for s in steps) / 400
    disagree = sum(bool(s.any() and not s.all()) for s in steps) / 400
    assert 0.88 < touched < 0.99
    assert disagree > 0.8


def test_default_gate_is_batch_and_unknown_gate_is_rejected():
    gen_a, gen_b = _generator(5), _generator(5)
    a = sample_mix_mask(6, 8, 8, mode="cutmix", prob=0.5, generator=gen_a)
    b = sample_mix_mask(6, 8, 8, mode="cutmix", prob=0.5, generator=gen_b, gate="batch")
    assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="mix gate"):
        sample_mix_mask(4, 8, 8, mode="cutmix", generator=_generator(), gate="pixel")


def test_mix_refuses_a_mode_that_does_not_mix():
    image, _ = _encoded_batch()
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    for mode in ("none", "cutmx"):
        with pytest.raises(ConfigError, match=f"mixing mode '{mode}' does not mix"):
            mix(mode, mask, image)
