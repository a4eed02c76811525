"""The S4MC idea as pure tensor functions (docs/method.md, steps 5-8).

- step 5 (DPA): `indicator_map` gives the per-pixel confidence indicator and `threshold`
  the percentile gamma over valid pixels, at the keep-percent kappa that `keep_percent_at`
  schedules;
- step 6 (PLR): `refine` folds the k largest neighbour probabilities into each pixel;
- steps 7-8: `pseudo_label_target` drops the unreliable pixels and `pseudo_label_loss`
  adds U2PL's scaled cross-entropy on top.

Nothing here copies a map to the host or calls `.item()`: on CUDA every statistic stays
a 0-dim device tensor, so a training step never waits on the GPU for bookkeeping.
"""
import math
from dataclasses import dataclass

import torch

from s4mc.diagnostics import pseudo_label_diagnostics
from s4mc.errors import ConfigError
from s4mc.losses import masked_ce_sum
from s4mc.percentile import masked_percentile

INDICATORS = ("margin", "confidence", "entropy")
BETA = math.exp(-0.5)
_NEIGHBOUR_OFFSETS = {
    4: ((-1, 0), (1, 0), (0, -1), (0, 1)),
    8: ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)),
}


def indicator_map(prob, indicator="margin"):
    """Per-pixel indicator [B,H,W] of probabilities [B,C,H,W] (docs/method.md steps 5 and 7).

    `indicator` is one of INDICATORS; the config schema checks it, like every setting here.
    """
    if indicator == "margin":
        if prob.shape[1] < 2:
            raise ValueError(f"the margin indicator needs at least 2 classes, got shape {tuple(prob.shape)}")
        # A running top-2 over the classes: exact like topk, and much faster than topk over
        # a strided dimension.
        first = prob[:, 0].clone()
        second = torch.full_like(first, -math.inf)
        smaller = torch.empty_like(first)
        for c in range(1, prob.shape[1]):
            torch.minimum(first, prob[:, c], out=smaller)
            torch.maximum(first, prob[:, c], out=first)
            torch.maximum(second, smaller, out=second)
        return first.sub_(second)
    if indicator == "confidence":
        return prob.amax(dim=1)
    return -(prob * torch.log(prob + 1e-10)).sum(dim=1)


def threshold(indicator_map, valid, percent):
    """docs/method.md step 5's gamma: numpy.percentile(indicator_map[valid], percent) ("linear"), as a
    float64 0-dim tensor; 0 with no valid pixel. Never syncs with the GPU (see s4mc.percentile).
    """
    if indicator_map.shape != valid.shape:
        raise ValueError(f"indicator map {tuple(indicator_map.shape)} and valid mask "
                         f"{tuple(valid.shape)} differ in shape")
    return masked_percentile(indicator_map, valid, percent)


def _resolve_prior(prior, num_classes, like):
    if prior is None:
        return None
    prior = torch.as_tensor(prior).to(device=like.device, dtype=like.dtype)
    if prior.shape != (num_classes,):
        raise ConfigError(f"neighbour prior has shape {tuple(prior.shape)}, expected ({num_classes},) "
                          f"for {num_classes} classes")
    return prior.view(1, num_classes, 1, 1)


def refine(prob, neighbors=4, k=1, prior=None):
    """Neighbour refinement (PLR) of probabilities [B,C,H,W] (non-negative), docs/method.md step 6.

    For every class, the k largest neighbour probabilities q (zero-padded borders) are
    folded in descending order: p <- p + beta*q - beta*max(p*q, p*E), E the per-class
    prior [C] (None: 0). The result is not renormalised. Computed in at least fp32.
    """
    if prob.dim() != 4:
        raise ValueError(f"prob must be [B,C,H,W], got shape {tuple(prob.shape)}")
    p = prob.detach()
    if p.dtype not in (torch.float32, torch.float64):
        p = p.float()
    height, width = p.shape[-2:]
    # Running top-k by insertion into k buffers, updated in place on shifted slices: no
    # padded copy and no [neighbours, B, C, H, W] stack to sort. Starting the buffers at 0
    # is exactly zero padding because probabilities are non-negative.
    top = [torch.zeros_like(p) for _ in range(k)]
    for offset in _NEIGHBOUR_OFFSETS[neighbors]:
        target, source = _shifted_slices(offset, height, width)
        v = p[source]
        for j, slot in enumerate(top):
            slot = slot[target]
            pushed_out = torch.minimum(slot, v) if j + 1 < k else None
            torch.maximum(slot, v, out=slot)
            if pushed_out is None:
                break
            v = pushed_out
    e = _resolve_prior(prior, p.shape[1], p)
    for q in top:
        refined = torch.add(p, q, alpha=BETA)
        # p >= 0, so p*max(q, E) == max(p*q, p*E) exactly (rounding is monotone).
        if e is not None:
            torch.maximum(q, e, out=q)
        p = refined.sub_(q.mul_(p), alpha=BETA)
    return p


def _shifted_slices(offset, height, width):
    """Index tuples (target, source) such that target pixel x reads its neighbour x + offset."""
    def span(d, n):
        return slice(max(-d, 0), n - max(d, 0)), slice(max(d, 0), n - max(-d, 0))

    (target_y, source_y), (target_x, source_x) = span(offset[0], height), span(offset[1], width)
    return (..., target_y, target_x), (..., source_y, source_x)


_refine = refine  # pseudo_label_target's `refine` flag shadows the function


def _reliable(ind, gamma, indicator):
    ind = ind.to(torch.float64)
    return ind < gamma if indicator == "entropy" else ind > gamma


def indicator_maps(teacher_logits, indicator="margin", neighbors=4, k=1, prior=None, refine=True):
    """The dense part of docs/method.md steps 5-7: the fp32 softmax p, its indicator map, and the indicator
    map of the refined p (None without refinement).

    Only elementwise work and class reductions, with no data-dependent shapes: this is what
    `trainer.compile` fuses into a few kernels (see `pseudo_label_target`'s `maps`).
    """
    prob = torch.softmax(teacher_logits.float(), dim=1)
    raw = indicator_map(prob, indicator)
    return raw, (indicator_map(_refine(prob, neighbors, k, prior), indicator) if refine else None)


def pseudo_label_target(teacher_logits, pseudo_label, keep_percent, *, indicator="margin", neighbors=4,
                        k=1, prior=None, refine=True, ground_truth=None, ignore_index=255, maps=None):
    """docs/method.md steps 5-7: the pseudo-label with unreliable pixels set to `ignore_index`.

    Returns (target [B,H,W] int64, stats). gamma always comes from the unrefined
    probabilities; with `refine` the keep/drop decision uses the refined ones, but a kept
    pixel's class is always its pseudo-label. `maps` replaces `indicator_maps` (the training
    step passes a torch.compile'd one under `trainer.compile`).
    """
    if teacher_logits.dim() != 4 or pseudo_label.shape != teacher_logits.shape[:1] + teacher_logits.shape[2:]:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match pseudo-label "
                         f"{tuple(pseudo_label.shape)}; expected [B,C,H,W] and [B,H,W]")
    if ground_truth is not None and ground_truth.shape != pseudo_label.shape:
        raise ValueError(f"ground truth {tuple(ground_truth.shape)} does not match pseudo-label "
                         f"{tuple(pseudo_label.shape)}")
    pseudo_label = pseudo_label.long()
    with torch.no_grad(), torch.autocast(teacher_logits.device.type, enabled=False):
        maps = indicator_maps if maps is None else maps
        raw, refined = maps(teacher_logits.detach(), indicator, neighbors, k, prior, refine)
        valid = pseudo_label != ignore_index
        percent = keep_percent if indicator == "entropy" else 100.0 - keep_percent
        gamma = threshold(raw, valid, percent)
        keep_mask_unrefined = valid & _reliable(raw, gamma, indicator)
        keep_mask = valid & _reliable(refined, gamma, indicator) if refine else keep_mask_unrefined
        target = pseudo_label.masked_fill(~keep_mask, ignore_index)
        stats = pseudo_label_diagnostics(valid, keep_mask, keep_mask_unrefined, pseudo_label, ground_truth, ignore_index,
                                         raw=raw if refine else None, low_is_reliable=indicator == "entropy")
    return target, {"threshold": gamma, **stats}


def pseudo_label_loss(student_logits, teacher_logits, pseudo_label, keep_percent, *, indicator="margin",
                      neighbors=4, k=1, prior=None, refine=True, ground_truth=None, ignore_index=255,
                      maps=None):
    """docs/method.md step 8: L_u = (B*H*W / kept) * CE(student, target), with target from steps 5-7.

    Gradients reach only `student_logits`. The CE is computed in fp32 whatever the input
    dtype; with nothing kept the loss is an exact 0 that still backpropagates (zeros).
    Returns (loss, target, stats): the masked target, and stats as detached 0-dim tensors
    (see `pseudo_label_target`).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    target, stats = pseudo_label_target(
        teacher_logits, pseudo_label, keep_percent, indicator=indicator, neighbors=neighbors, k=k,
        prior=prior, refine=refine, ground_truth=ground_truth, ignore_index=ignore_index, maps=maps)
    ce_sum = masked_ce_sum(student_logits, target, ignore_index)
    with torch.autocast(student_logits.device.type, enabled=False):
        kept = (target != ignore_index).sum().clamp(min=1).float()
        loss = (ce_sum / kept) * (target.numel() / kept)
    return loss, target, stats


def keep_percent_at(epoch: int, epochs: int, start: float = 60.0, *, iteration: int | None = None,
                    iters_per_epoch: int | None = None) -> float:
    """Keep-percent kappa = 100 - (100 - kappa0)(1 - epoch/epochs) of docs/method.md step 5.

    The release steps it once per epoch (`epoch` counts from 0); give `iteration` and
    `iters_per_epoch` to move it smoothly within the epoch instead.
    """
    progress = float(epoch)
    if iteration is not None:
        progress += iteration / iters_per_epoch
    progress = min(max(progress / epochs, 0.0), 1.0)
    return 100.0 - (100.0 - start) * (1.0 - progress)


@dataclass(frozen=True)
class S4MCSettings:
    """The S4MC part of `trainer.unsupervised`, read once from the validated config.

    Every training method that masks pseudo-labels the S4MC way goes through `loss`, so the
    keywords of `pseudo_label_loss` are spelled out in one place.
    """

    indicator: str
    neighborhood_size: int
    num_neighbors: int
    refine: bool
    keep_percent: float  # kappa_0, where the schedule starts
    keep_schedule: str  # "epoch" (the release) or "iteration"
    epochs: int
    ignore_index: int

    @classmethod
    def from_config(cls, cfg: dict) -> "S4MCSettings":
        unsup = cfg["trainer"]["unsupervised"]
        return cls(indicator=unsup["indicator"], neighborhood_size=unsup["neighborhood_size"],
                   num_neighbors=unsup["num_neighbors"], refine=unsup["refine"],
                   keep_percent=unsup["keep_percent"], keep_schedule=unsup["keep_schedule"],
                   epochs=cfg["trainer"]["epochs"], ignore_index=cfg["dataset"]["ignore_index"])

    def keep_percent_at(self, epoch: int, iteration: int, iters_per_epoch: int) -> float:
        """kappa for this step; `iteration` is the global count."""
        if self.keep_schedule == "iteration":
            return keep_percent_at(epoch, self.epochs, self.keep_percent,
                                   iteration=iteration % iters_per_epoch, iters_per_epoch=iters_per_epoch)
        return keep_percent_at(epoch, self.epochs, self.keep_percent)

    def _keywords(self) -> dict:
        return dict(indicator=self.indicator, neighbors=self.neighborhood_size, k=self.num_neighbors,
                    refine=self.refine, ignore_index=self.ignore_index)

    def loss(self, student_logits, teacher_logits, pseudo_label, keep_percent, *, prior=None,
             ground_truth=None, maps=None):
        """`pseudo_label_loss` with these settings: (loss, target, stats)."""
        return pseudo_label_loss(student_logits, teacher_logits, pseudo_label, keep_percent, prior=prior,
                                 ground_truth=ground_truth, maps=maps, **self._keywords())

    def target(self, teacher_logits, pseudo_label, keep_percent, *, prior=None, ground_truth=None, maps=None):
        """`pseudo_label_target` with these settings: (target, stats)."""
        return pseudo_label_target(teacher_logits, pseudo_label, keep_percent, prior=prior,
                                   ground_truth=ground_truth, maps=maps, **self._keywords())


def describe_selection(cfg: dict) -> str:
    """How a run keeps pseudo-labels, for the run header: the indicator, and the refinement or its absence."""
    unsup = cfg["trainer"]["unsupervised"]
    refine = (f"S4MC refinement on ({unsup['neighborhood_size']}-neighbourhood, k {unsup['num_neighbors']})"
              if unsup["refine"] else "refinement off (CutMix-Seg baseline)")
    return f"{unsup['indicator']} threshold, {refine}"
