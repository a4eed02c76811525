"""The mean-teacher method: S4MC, CutMix-Seg and ψ (docs/method.md, "One semi-supervised iteration").

weak view → pseudo-label → mix → student → teacher → refine/threshold/mask → losses. The
EMA step of the teacher and the optimizer step are the engine's (s4mc/engine/step.py).
Its settings are `trainer.unsupervised`, which S4MC's core reads too (s4mc/pseudo_label.py).
"""

from __future__ import annotations

import torch

from s4mc import mixing
from s4mc.losses import supervised_loss
from s4mc.methods.base import StepLoss, begin_semi_phase, register_method, supervised_step, upsample, visuals
from s4mc.pseudo_label import S4MCSettings, describe_selection
from s4mc.terms import TermInputs, apply_terms, describe_terms


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

    @classmethod
    def describe(cls, cfg: dict) -> str:
        unsup = cfg["trainer"]["unsupervised"]
        return (f"mean teacher, semi-supervised, {describe_selection(cfg)}, mixing {unsup['mixing']}, "
                f"FixMatch strong view {'on' if unsup['strong_aug'] else 'off'}, {describe_terms(cfg)}")

    def loss(self, state, labeled: dict, unlabeled: dict | None) -> StepLoss:
        img_x, mask_x = state.to_device(labeled["image"], image=True), state.to_device(labeled["label"])
        if unlabeled is None or state.epoch < self.sup_only_epoch:
            return supervised_step(state, img_x, mask_x, self.cfg, warm_teacher_on=None if unlabeled is None else img_x)
        return self.semi_step(state, img_x, mask_x, unlabeled)

    def semi_step(self, state, img_x, mask_x, unlabeled: dict) -> StepLoss:
        begin_semi_phase(state, self.cfg)
        student_fwd, teacher_fwd = state.forwards()
        size, ignore = mask_x.shape[-2:], self.s4mc.ignore_index
        strong = "image_strong" if self.strong_aug and "image_strong" in unlabeled else "image"
        has_partner = "partner_image" in unlabeled
        # img_u_s is the student's view: the strong one with strong_aug, else the weak one itself.
        img_u_w, img_u_s = (state.to_device(unlabeled[key], image=True) for key in ("image", strong))
        gt_u = state.to_device(unlabeled["label"])  # diagnostics only, never trained on
        img_p_w = img_p_s = gt_p = None  # the partner batch (a per-GPU batch of 1)
        if has_partner:
            img_p_w, img_p_s = (state.to_device(unlabeled[f"partner_{key}"], image=True) for key in ("image", strong))
            gt_p = state.to_device(unlabeled["partner_label"])
        n_u, n_x = img_u_w.shape[0], img_x.shape[0]

        # 1. Weak view: the eval-mode teacher's argmax is the hard pseudo-label ŷ.
        state.teacher.eval()
        with torch.no_grad():
            with state.autocast():
                pred_u_w = teacher_fwd(torch.cat([img_u_w, img_p_w]) if has_partner else img_u_w)["pred"]
            mask_all = upsample(pred_u_w, size).softmax(1).argmax(1)
        mask_u_w, mask_p_w = mask_all[:n_u], (mask_all[n_u:] if has_partner else None)

        # 2. Strong view: mix images, pseudo-labels and ground truth with the same box.
        img_u_s_mix, img_u_t_mix = img_u_s, img_u_w  # the student's and the teacher's mixed views
        if self.mode != "none":
            box = mixing.sample_mix_mask(
                n_u, *size, mode=self.mode, prob=self.mix_prob, generator=state.generator, device=state.device,
                pseudo_label=mask_u_w, partner_label=mask_p_w, ignore_index=ignore, gate=self.mix_gate)
            img_u_s_mix = mixing.mix(self.mode, box, img_u_s, img_p_s, fill=0.0)
            img_u_t_mix = mixing.mix(self.mode, box, img_u_w, img_p_w, fill=0.0) if strong != "image" else img_u_s_mix
            mask_u_w = mixing.mix(self.mode, box, mask_u_w, mask_p_w, fill=ignore)
            gt_u = mixing.mix(self.mode, box, gt_u, gt_p, fill=ignore)
        img_u_s_mix, img_u_t_mix = state.memory_format(img_u_s_mix), state.memory_format(img_u_t_mix)

        # 3. Student on labeled + strong unlabeled, one forward.
        state.student.train()
        with state.autocast():
            out = student_fwd(torch.cat([img_x, img_u_s_mix]))
        loss_x = supervised_loss({k: v[:n_x] for k, v in out.items()}, mask_x, self.cfg, size)

        # 4. Teacher again, train-mode BN as the release does, on the same mixed batch.
        state.teacher.train()
        with torch.no_grad(), state.autocast():
            out_t = teacher_fwd(torch.cat([img_x, img_u_t_mix]))

        # 5-8. Threshold on unrefined p, refine, mask, scaled CE (all fp32/fp64 inside).
        keep_percent = self.s4mc.keep_percent_at(state.epoch, state.iteration, state.iters_per_epoch)
        loss_u, target_u, stats = self.s4mc.loss(
            upsample(out["pred"][n_x:], size), upsample(out_t["pred"][n_x:], size), mask_u_w, keep_percent,
            prior=state.prior, ground_truth=gt_u, maps=state.indicator_maps)
        total = loss_x + self.unsup_weight * loss_u
        if state.capture_visuals:
            state.visuals = visuals(img_u_s_mix, out_t["pred"][n_x:], target_u, gt_u, size)
        metrics = dict(loss_sup=loss_x.detach(), loss_unsup=loss_u.detach(),
                       keep_percent=torch.tensor(keep_percent), **stats)

        # 9. Additive terms (e.g. S4MC + U2PL's contrastive term on `rep`), already weighted.
        loss_terms, term_metrics = apply_terms(state, TermInputs(out, out_t, mask_x, mask_u_w, self.s4mc.epochs))
        if loss_terms is not None:
            total = total + loss_terms
        return StepLoss(total, {**metrics, **term_metrics}, update_teacher=True)
