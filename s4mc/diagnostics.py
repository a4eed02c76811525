"""What the logs report about the pseudo-labels of a step.

Kept fractions with and without refinement, how many pixels refinement flipped (and their share),
and, when the unlabeled images have ground truth (benchmarks, ablations), how often a kept
pseudo-label is right.
"""
import math

import torch


def pseudo_label_diagnostics(valid, keep, keep_raw, pseudo_label, ground_truth, ignore_index, *,
                             raw=None, low_is_reliable=False):
    """Kept fractions, refinement flips and (with ground truth) kept accuracy, as 0-dim tensors.

    All counts come from one reduction over the stacked masks (exact int64), not from some
    twenty small reductions per step. With ground truth and the unrefined indicator map `raw`
    (given when the step refines), also `kept_accuracy_same_share` (see `same_share_accuracy`).
    """
    both = keep & keep_raw  # keep and keep_raw are subsets of valid
    masks = [valid, keep, keep_raw, both]
    if ground_truth is not None:
        labelled = ground_truth != ignore_index
        right = labelled & (pseudo_label == ground_truth)
        masks += [keep & labelled, keep & right, keep_raw & labelled, keep_raw & right]
    counts = torch.stack([m.reshape(-1) for m in masks]).sum(dim=1).to(torch.float64)
    n_valid = counts[0].clamp(min=1)
    stats = {
        "kept_fraction": counts[1] / n_valid,
        "kept_fraction_unrefined": counts[2] / n_valid,
        "flipped_to_keep": counts[1] - counts[3],
        "flipped_to_drop": counts[2] - counts[3],
        # the refinement's reach: the share of valid pixels whose keep/drop decision it changed
        "flipped_fraction": (counts[1] + counts[2] - 2 * counts[3]) / n_valid,
    }
    if ground_truth is not None:
        # 0 when no kept pixel has ground truth, so averaged logs stay finite.
        stats["kept_accuracy"] = counts[5] / counts[4].clamp(min=1)
        stats["kept_accuracy_unrefined"] = counts[7] / counts[6].clamp(min=1)
        if raw is not None:
            stats["kept_accuracy_same_share"] = same_share_accuracy(raw, valid, counts[1], right, labelled,
                                                                    low_is_reliable)
    return stats


def reliability_order(raw, valid, low_is_reliable=False):
    """Flat pixel indices, the valid ones first, most reliable by the indicator map `raw` first;
    ties broken by position. What a threshold moved to keep n pixels keeps: the first n."""
    score = raw.detach().reshape(-1).float()
    score = score.masked_fill(~valid.reshape(-1), math.inf if low_is_reliable else -math.inf)
    return score.argsort(descending=not low_is_reliable, stable=True)


def same_share_accuracy(raw, valid, kept, right, labelled, low_is_reliable=False):
    """Accuracy of the `kept` pixels the unrefined indicator `raw` ranks most reliable.

    That is what the threshold alone keeps when moved to keep as many pixels as the refinement
    did. The paper's claim is that refinement picks *better* pixels, not only more or fewer
    (docs/method.md, "The toy study"): it holds where `kept_accuracy` beats this number. Ties
    are broken by position; no host sync (`kept` is a device count).
    """
    order = reliability_order(raw, valid, low_is_reliable)
    ranked = torch.stack([right.reshape(-1)[order], labelled.reshape(-1)[order]]).cumsum(dim=1)
    at = (kept.long() - 1).clamp(min=0)
    right_n, labelled_n = ranked.index_select(1, at.view(1)).view(2).to(torch.float64)
    return torch.where(kept > 0, right_n / labelled_n.clamp(min=1), torch.zeros_like(right_n))
