"""Cross-entropy that ignores pixels, and the supervised losses built on it (plain CE, U2PL's
probability OHEM, the aux head).

`masked_ce_sum` is the one cross-entropy of the package: each loss divides its sum by what its
paper divides by (the valid pixels here, the kept pixels in S4MC's loss, all pixels in UniMatch's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_ce_sum(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy summed over the pixels whose target is not `ignore_index`, in fp32."""
    with torch.autocast(logits.device.type, enabled=False):
        return F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Mean CE over non-ignored pixels, in fp32; 0 (with a graph) when all are ignored."""
    valid = (target != ignore_index).sum()
    return masked_ce_sum(logits, target, ignore_index) / valid.clamp(min=1)


def ohem_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *, thresh: float = 0.7, min_kept: int = 100000, ignore_index: int = 255
) -> torch.Tensor:
    """CE over the hard pixels: those whose probability of the true class is at most
    max(thresh, the min_kept-th smallest such probability), as U2PL's Cityscapes recipe.

    Computed on the device without reading the count back to the host.
    """
    logits = logits.float()
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    with torch.no_grad():
        prob = logits.softmax(1).gather(1, safe_target.unsqueeze(1)).squeeze(1)
        prob = torch.where(valid, prob, torch.full_like(prob, float("inf")))
        flat = prob.flatten()
        num_valid = valid.sum()
        kth = min(min_kept, flat.numel())
        if kth > 0:
            kth_value = torch.kthvalue(flat, kth).values
            threshold = torch.maximum(kth_value, torch.tensor(thresh, device=flat.device))
        else:
            threshold = torch.tensor(thresh, device=flat.device)
        # Too few valid pixels for OHEM: U2PL then keeps every valid pixel.
        keep = torch.where(num_valid <= min_kept, valid, valid & (prob <= threshold))
    kept_target = torch.where(keep, target, torch.full_like(target, ignore_index))
    return cross_entropy(logits, kept_target, ignore_index)


def supervised_loss(outputs: dict, target: torch.Tensor, cfg: dict, size: tuple[int, int]) -> torch.Tensor:
    """L_s on the labeled part (docs/method.md step 3): CE or OHEM, plus weight·aux when the aux head is on."""
    ignore = cfg["dataset"]["ignore_index"]
    crit = cfg["criterion"]

    def one(logits):
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=True)
        if crit["type"] == "ohem":
            return ohem_cross_entropy(
                logits, target, thresh=crit["kwargs"]["thresh"], min_kept=crit["kwargs"]["min_kept"], ignore_index=ignore
            )
        return cross_entropy(logits, target, ignore)

    loss = one(outputs["pred"])
    aux_cfg = cfg["net"]["aux_loss"]
    if aux_cfg is not None and "aux" in outputs:
        loss = loss + aux_cfg["loss_weight"] * one(outputs["aux"])
    return loss
