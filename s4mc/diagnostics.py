"""What the logs report about the pseudo-labels of a step.

Kept fractions with and without refinement, how many pixels refinement flipped, and, when the
unlabeled images have ground truth (benchmarks, ablations), how often a kept pseudo-label is right.
"""
import torch


def pseudo_label_diagnostics(valid, keep, keep_raw, pseudo_label, ground_truth, ignore_index):
    """Kept fractions, refinement flips and (with ground truth) kept accuracy, as 0-dim tensors.

    All counts come from one reduction over the stacked masks (exact int64), not from some
    twenty small reductions per step.
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
    }
    if ground_truth is not None:
        # 0 when no kept pixel has ground truth, so averaged logs stay finite.
        stats["kept_accuracy"] = counts[5] / counts[4].clamp(min=1)
        stats["kept_accuracy_unrefined"] = counts[7] / counts[6].clamp(min=1)
    return stats
