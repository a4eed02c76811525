"""Tests for s4mc.percentile, shared by the S4MC threshold and U2PL's entropy split."""
import math

import numpy as np
import pytest
import torch

from s4mc.percentile import masked_percentile


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_numpy_on_a_masked_subset(dtype, percentile_path):
    g = torch.Generator().manual_seed(0)
    values = torch.rand(1000, generator=g).to(dtype)
    valid = torch.rand(1000, generator=g) < 0.3
    reference = values[valid].double().numpy()
    for q in (0.0, 7.5, 20.0, 50.0, 80.0, 99.5, 100.0):
        got = masked_percentile(values, valid, q)
        assert got.dtype == torch.float64 and got.dim() == 0
        assert math.isclose(float(got), float(np.percentile(reference, q)), rel_tol=0, abs_tol=1e-12)


def test_shape_of_the_mask_only_has_to_match_in_size(percentile_path):
    values = torch.arange(12.0).view(3, 4)
    valid = (torch.arange(12) % 3 == 0).view(2, 6)  # entries 0, 3, 6, 9
    assert float(masked_percentile(values, valid, 50)) == pytest.approx(4.5)


@pytest.mark.parametrize("empty", [0.0, math.nan, -1.0])
def test_empty_mask_returns_the_given_value(empty, percentile_path):
    values = torch.rand(5, 7)
    got = float(masked_percentile(values, torch.zeros(5, 7, dtype=torch.bool), 30.0, empty=empty))
    assert (math.isnan(got) and math.isnan(empty)) or got == empty


def test_single_valid_entry_and_infinite_neighbours(percentile_path):
    values = torch.tensor([math.inf, 0.25, -math.inf, 3.0])
    valid = torch.tensor([False, True, False, False])
    for q in (0.0, 50.0, 100.0):
        assert float(masked_percentile(values, valid, q)) == 0.25
