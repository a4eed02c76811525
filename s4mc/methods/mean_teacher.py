"""The mean-teacher method: S4MC, CutMix-Seg and ψ (docs/method.md, "One semi-supervised iteration").

weak view → pseudo-label → mix → student → teacher → refine/threshold/mask → losses. The
EMA step of the teacher and the optimizer step are the engine's (s4mc/engine/step.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from s4mc import mixing
from s4mc.ema import copy_buffers, copy_parameters
from s4mc.losses import supervised_loss
from s4mc.pseudo_label import S4MCSettings
from s4mc.methods import StepLoss, register_method
from s4mc.terms import TermInputs, apply_terms


def upsample(logits: torch.Tensor, size) -> torch.Tensor:
    # fp32 before resizing: the softmax, percentile and refinement that follow must see fp32 values.
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=True)


def mix(mode: str, mask, x, partner_x, fill):
    """`x` mixed by `mask`: erased to `fill` for Cutout, else pasted from `partner_x` (None: the batch rolled)."""
    if mode == "cutout":
        return mixing.apply_mix(x, mask, fill=fill)
    return mixing.apply_mix(x, mask, partner=partner_x)


def supervised_step(state, x_l, y_l, cfg, warm_teacher_on=None) -> StepLoss:
    """Labeled data only: `trainer.mode: sup`, or the warm-up epochs before `trainer.sup_only_epoch`."""
    student_fwd, teacher_fwd = state.forwards()
    state.student.train()
    with state.autocast():
        out = student_fwd(x_l)
    loss_sup = supervised_loss(out, y_l, cfg, y_l.shape[-2:])
    if warm_teacher_on is not None:
        # Warm-up: train-mode teacher forwards warm its BN statistics (docs/method.md step 11).
        state.teacher.train()
        with torch.no_grad(), state.autocast():
            teacher_fwd(warm_teacher_on)
    return StepLoss(loss_sup, {"loss_sup": loss_sup.detach()})


def begin_semi_phase(state, cfg: dict) -> None:
    """On the first semi-supervised step the teacher starts as a copy of the student (EMA t0):
    its parameters, and with `trainer.teacher_start: all` its BN statistics too."""
    if state.semi_start is None:
        copy_parameters(state.teacher, state.student_module)
        if cfg["trainer"]["teacher_start"] == "all":
            copy_buffers(state.teacher, state.student_module)
        state.semi_start = state.iteration


@register_method("mean_teacher")
class MeanTeacher:

    def __init__(self, cfg: dict):
        self.cfg = cfg
        unsup = cfg["trainer"]["unsupervised"]
        self.s4mc = S4MCSettings.from_config(cfg)
        self.mode, self.mix_prob, self.mix_gate = unsup["mixing"], unsup["mix_prob"], unsup["mix_gate"]
        self.strong_aug, self.unsup_weight = unsup["strong_aug"], unsup["unsup_weight"]
        self.sup_only_epoch = cfg["trainer"]["sup_only_epoch"]

    @classmethod
    def strong_views(cls, cfg: dict) -> int:
        return 1 if cfg["trainer"]["unsupervised"]["strong_aug"] else 0

    @classmethod
    def needs_partner(cls, cfg: dict) -> bool:
        # A per-GPU batch of 1 has nobody to mix with (an image must never be mixed with itself).
        return cfg["dataset"]["batch_size"] == 1 and cfg["trainer"]["unsupervised"]["mixing"] in ("cutmix", "classmix")

    def loss(self, state, labeled: dict, unlabeled: dict | None) -> StepLoss:
        x_l, y_l = state.to_device(labeled["image"], image=True), state.to_device(labeled["label"])
        if unlabeled is None or state.epoch < self.sup_only_epoch:
            return supervised_step(state, x_l, y_l, self.cfg, warm_teacher_on=None if unlabeled is None else x_l)
        return self.semi_step(state, x_l, y_l, unlabeled)

    def semi_step(self, state, x_l, y_l, unlabeled: dict) -> StepLoss:
        begin_semi_phase(state, self.cfg)
        student_fwd, teacher_fwd = state.forwards()
        size, ignore = y_l.shape[-2:], self.s4mc.ignore_index
        strong = "image_strong" if self.strong_aug and "image_strong" in unlabeled else "image"
        has_partner = "partner_image" in unlabeled
        x_u, x_u_student = (state.to_device(unlabeled[key], image=True) for key in ("image", strong))
        gt_u = state.to_device(unlabeled["label"])
        partner_weak = partner_student = partner_gt = None
        if has_partner:
            partner_weak, partner_student = (state.to_device(unlabeled[f"partner_{key}"], image=True)
                                             for key in ("image", strong))
            partner_gt = state.to_device(unlabeled["partner_label"])
        n_u, n_l = x_u.shape[0], x_l.shape[0]

        # 1. Weak view: the eval-mode teacher's argmax is the hard pseudo-label ŷ.
        state.teacher.eval()
        with torch.no_grad():
            with state.autocast():
                logits_weak = teacher_fwd(torch.cat([x_u, partner_weak]) if has_partner else x_u)["pred"]
            pseudo_all = upsample(logits_weak, size).softmax(1).argmax(1)
        pseudo_label, partner_pseudo = pseudo_all[:n_u], (pseudo_all[n_u:] if has_partner else None)

        # 2. Strong view: mix images, pseudo-labels and ground truth with the same mask.
        x_mix, x_mix_teacher = x_u_student, x_u
        if self.mode != "none":
            mask = mixing.sample_mix_mask(
                n_u, *size, mode=self.mode, prob=self.mix_prob, generator=state.generator, device=state.device,
                pseudo_label=pseudo_label, partner_label=partner_pseudo, ignore_index=ignore, gate=self.mix_gate)
            x_mix = mix(self.mode, mask, x_u_student, partner_student, 0.0)
            x_mix_teacher = mix(self.mode, mask, x_u, partner_weak, 0.0) if strong != "image" else x_mix
            pseudo_label = mix(self.mode, mask, pseudo_label, partner_pseudo, ignore)
            gt_u = mix(self.mode, mask, gt_u, partner_gt, ignore)
        x_mix, x_mix_teacher = state.memory_format(x_mix), state.memory_format(x_mix_teacher)

        # 3. Student on labeled + strong unlabeled, one forward.
        state.student.train()
        with state.autocast():
            out = student_fwd(torch.cat([x_l, x_mix]))
        loss_sup = supervised_loss({k: v[:n_l] for k, v in out.items()}, y_l, self.cfg, size)

        # 4. Teacher again, train-mode BN as the release does, on the same mixed batch.
        state.teacher.train()
        with torch.no_grad(), state.autocast():
            out_t = teacher_fwd(torch.cat([x_l, x_mix_teacher]))

        # 5-8. Threshold on unrefined p, refine, mask, scaled CE (all fp32/fp64 inside).
        keep_percent = self.s4mc.keep_percent_at(state.epoch, state.iteration, state.iters_per_epoch)
        loss_unsup, target, stats = self.s4mc.loss(
            upsample(out["pred"][n_l:], size), upsample(out_t["pred"][n_l:], size), pseudo_label, keep_percent,
            prior=state.prior, ground_truth=gt_u, maps=state.indicator_maps)
        total = loss_sup + self.unsup_weight * loss_unsup
        if state.capture_visuals:
            state.visuals = visuals(x_mix, out_t["pred"][n_l:], target, gt_u, size)
        metrics = dict(loss_sup=loss_sup.detach(), loss_unsup=loss_unsup.detach(),
                       keep_percent=torch.tensor(keep_percent), **stats)

        # 9. Additive terms (e.g. S4MC + U2PL's contrastive term on `rep`), already weighted.
        loss_terms, term_metrics = apply_terms(state, TermInputs(out, out_t, y_l, pseudo_label, self.s4mc.epochs))
        if loss_terms is not None:
            total = total + loss_terms
        return StepLoss(total, {**metrics, **term_metrics}, update_teacher=True)


@torch.no_grad()
def visuals(images, teacher_logits, target, ground_truth, size, count: int = 4) -> dict:
    """A few unlabeled samples for TensorBoard: image, teacher prediction, masked pseudo-label, ground truth."""
    return {"image": images[:count].float().cpu(), "prediction": upsample(teacher_logits[:count], size).argmax(1).cpu(),
            "pseudo_label": target[:count].cpu(), "ground_truth": ground_truth[:count].cpu()}
