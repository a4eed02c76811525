"""numpy.percentile over the masked entries of a device tensor, without a host sync.

The S4MC threshold (docs/method.md step 5) and U2PL's entropy split (step 9) both need a percentile
of the valid pixels of a map, every step. Boolean indexing or `.item()` would stall the
GPU until the map is ready, and torch.quantile refuses inputs above 2**24 entries, so the
device path sorts with the invalid entries pushed to +inf and reads both order statistics
at device-side indices.
"""
import math

import torch


def masked_percentile(values, valid, percent, *, empty=0.0):
    """numpy.percentile(values[valid], percent) ("linear"), as a float64 0-dim tensor.

    `values` is float32 or float64 (anything else is converted to float32); `valid` a bool
    tensor of the same number of entries. `empty` is returned when nothing is valid.
    """
    values = values.detach().reshape(-1)
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    valid = valid.reshape(-1)
    if values.device.type == "cpu":
        a, b, t, any_valid = _order_statistics_cpu(values, valid, float(percent))
    else:
        a, b, t, any_valid = _order_statistics(values, valid, float(percent))
    # torch.lerp interpolates from the nearer end (t < 0.5: a + t(b-a), else b - (1-t)(b-a)),
    # as numpy's percentile does, so t=1 returns b exactly.
    return torch.where(any_valid, torch.lerp(a, b, t), empty)


def _order_statistics(values, valid, percent):
    """Device path: the two order statistics around the percentile's position, the
    interpolation weight and whether anything is valid, all as device tensors."""
    # Sorted in the input's precision: converting fp32 to float64 is exact and monotone, so
    # the order statistics equal those of a float64 sort, at half the radix passes.
    values = values.masked_fill(~valid, math.inf).sort().values
    count = valid.sum()
    last = (count - 1).clamp(min=0)
    position = last.to(torch.float64).mul(percent / 100.0)
    lo = position.floor()
    index = torch.stack([lo, lo + 1]).long().clamp(max=last)
    a, b = values.index_select(0, index).to(torch.float64)
    return a, b, position - lo, count > 0


def _order_statistics_cpu(values, valid, percent):
    """CPU path: syncs are free here, and selection (kthvalue) beats a full sort."""
    values = values[valid]
    n = values.numel()
    if n == 0:
        zero = torch.zeros((), dtype=torch.float64)
        return zero, zero, zero, torch.tensor(False)
    position = (n - 1) * (percent / 100.0)
    lo = math.floor(position)
    a = values.kthvalue(lo + 1).values.to(torch.float64)
    b = values.kthvalue(lo + 2).values.to(torch.float64) if lo + 1 < n else a
    return a, b, torch.tensor(position - lo, dtype=torch.float64), torch.tensor(True)
