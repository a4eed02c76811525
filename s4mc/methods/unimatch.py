"""UniMatch (Yang et al., CVPR 2023), and S4MC on top of it (docs/method.md, "UniMatch and S4MC + UniMatch").

One model by default: it makes its own pseudo-labels from the weak view, as UniMatch does
(`trainer.unimatch.ema: true` makes them with the EMA teacher instead). Per step:

- weak view → pseudo-labelling logits (and those of the partner images, in eval mode);
- two strong views, each with its own colour jitter / grayscale / blur draw (the data loader's
  `image_strong`, `image_strong_2`) and its own CutMix box and partner: view 1 takes from the
  partner batch, view 2 from the partner batch rolled by one image;
- the feature-perturbation branch: channel dropout (0.5) on the encoder features of the weak
  view, through the decoder;
- loss `(L_x + w_s·L_s1 + w_s·L_s2 + w_fp·L_fp) / 2`, each unlabeled term the cross-entropy
  summed over the kept pixels (fp32) and divided by all pixels.

Which pixels are kept is the only thing S4MC changes: `trainer.unsupervised.refine: false`
keeps those whose confidence reaches the fixed threshold (0.95); `refine: true` keeps those
that S4MC's neighbour refinement and dynamic (keep-percent) threshold keep, on every branch.

`trainer.unimatch.release_exact: true` trains as UniMatch's own code does instead
(`release_step`; docs/method.md, "UniMatch release-exact", items 2-7): two training forwards,
both strong views of image j pasted from mix image j (the same raw image, augmented afresh),
UniMatch's CutMix box drawn per image and view, the crop padding excluded and each unlabeled
loss divided by the non-padding pixels, the LR set after the step, and the stem's max-pool
without ceil_mode (required of the config).
"""

from __future__ import annotations

import torch

from s4mc import mixing
from s4mc.losses import masked_ce_sum, supervised_loss
from s4mc.methods.base import StepLoss, begin_semi_phase, register_method, supervised_step, upsample, visuals
from s4mc.pseudo_label import S4MCSettings, describe_selection
from s4mc.schema import NUM, key

# `trainer.unimatch`; the defaults are the UniMatch paper's.
SETTINGS = {
    "ema": key(False, bool),  # false: the student makes its own pseudo-labels, as UniMatch does
    "fp": key(True, bool),  # the feature-perturbation branch
    "fp_dropout": key(0.5, *NUM, low=0, high=0.99),
    "weight_strong": key(0.25, *NUM, low=0),  # each of the two strong views
    "weight_fp": key(0.5, *NUM, low=0),
    "threshold": key(0.95, *NUM, low=0, high=1),  # fixed confidence threshold, used when unsupervised.refine is false
    "release_exact": key(False, bool),  # UniMatch's training as its code does it (docs/method.md)
}


@register_method("unimatch", schema=SETTINGS)
class UniMatch:
    supports_terms = False  # terms see one student/teacher pair; UniMatch has three branches

    def __init__(self, cfg: dict):
        self.cfg = cfg
        unimatch, unsup = cfg["trainer"]["unimatch"], cfg["trainer"]["unsupervised"]
        self.s4mc = S4MCSettings.from_config(cfg)
        self.ema, self.fp, self.fp_dropout = unimatch["ema"], unimatch["fp"], unimatch["fp_dropout"]
        self.weight_strong, self.weight_fp = unimatch["weight_strong"], unimatch["weight_fp"]
        self.threshold = unimatch["threshold"]
        self.mix_prob, self.mix_gate = unsup["mix_prob"], unsup["mix_gate"]
        self.sup_only_epoch = cfg["trainer"]["sup_only_epoch"]
        self.release_exact = unimatch["release_exact"]
        self.lr_lag = 1 if self.release_exact else 0  # UniMatch writes the poly LR after optimizer.step()

    @classmethod
    def strong_views(cls, cfg: dict) -> int:
        return 2

    @classmethod
    def padding_mask(cls, cfg: dict) -> bool:
        return cfg["trainer"]["unimatch"]["release_exact"]

    @classmethod
    def partner_same_images(cls, cfg: dict) -> bool:
        return cfg["trainer"]["unimatch"]["release_exact"]

    @classmethod
    def check_config(cls, cfg: dict, fail) -> None:
        if not cfg["trainer"]["unimatch"]["release_exact"]:
            return
        if cfg["trainer"]["unimatch"]["ema"]:
            fail("trainer.unimatch.ema", "must be false with trainer.unimatch.release_exact: UniMatch has no EMA teacher")
        encoder = cfg["net"].get("encoder") or {}
        ceil_mode = (encoder.get("kwargs") or {}).get("ceil_mode")
        if (encoder.get("stem") or "deep") == "deep" and ceil_mode is not False:
            fail("net.encoder.kwargs.ceil_mode", f"is {ceil_mode!r}; trainer.unimatch.release_exact builds the stem as "
                 "UniMatch does, whose max-pool has ceil_mode false: set net.encoder.kwargs.ceil_mode: false")

    @classmethod
    def needs_partner(cls, cfg: dict) -> bool:
        # Mix partners come from a second pass over the unlabeled set, as UniMatch's mix loader.
        return True

    @classmethod
    def describe(cls, cfg: dict) -> str:
        u = cfg["trainer"]["unimatch"]
        selection = (describe_selection(cfg) if cfg["trainer"]["unsupervised"]["refine"]
                     else f"fixed confidence threshold {u['threshold']:g}")
        fp = (f"feature perturbation on (weight {u['weight_fp']:g}, dropout {u['fp_dropout']:g})" if u["fp"]
              else "feature perturbation off")
        if u["release_exact"]:
            return (f"UniMatch release-exact (two forwards, one mix image for both views, UniMatch's CutMix box, "
                    f"padding excluded, LR set after the step), {selection}, two strong views "
                    f"(weight {u['weight_strong']:g} each), {fp}")
        return (f"UniMatch ({'EMA teacher' if u['ema'] else 'single model'}), {selection}, two strong views "
                f"(weight {u['weight_strong']:g} each), {fp}")

    @classmethod
    def console_loss_parts(cls, cfg: dict, values: dict) -> list[str] | None:
        """The console's loss as the sum of what each branch adds to it: (L_x + w_s·L_s1 +
        w_s·L_s2 + w_fp·L_fp) / 2, term by term, so the parts add up to the total shown.
        None in the warm-up (the loss is L_x alone)."""
        if "loss_s1" not in values:
            return None
        u = cfg["trainer"]["unimatch"]
        weights = {"sup": 1.0, "s1": u["weight_strong"], "s2": u["weight_strong"], "fp": u["weight_fp"]}
        shares = [f"{name} {weight * values[f'loss_{name}'] / 2:.4f}" for name, weight in weights.items()
                  if f"loss_{name}" in values]
        return [f"loss {values.get('loss', float('nan')):.4f} = " + " + ".join(shares)]

    def loss(self, state, labeled: dict, unlabeled: dict | None) -> StepLoss:
        img_x, mask_x = state.to_device(labeled["image"], image=True), state.to_device(labeled["label"])
        if unlabeled is None or state.epoch < self.sup_only_epoch:
            warm = img_x if unlabeled is not None and self.ema else None
            return supervised_step(state, img_x, mask_x, self.cfg, warm_teacher_on=warm)
        if self.release_exact:
            return self.release_step(state, img_x, mask_x, unlabeled)
        return self.semi_step(state, img_x, mask_x, unlabeled)

    def semi_step(self, state, img_x, mask_x, unlabeled: dict) -> StepLoss:
        if self.ema:
            begin_semi_phase(state, self.cfg)
        student_fwd, teacher_fwd = state.forwards()
        size = mask_x.shape[-2:]
        n_x = img_x.shape[0]
        img_u_w, img_u_s1, img_u_s2, img_u_w_mix, img_u_s1_mix, img_u_s2_mix, gt_u, gt_u_mix = views(state, unlabeled)
        n_u = img_u_w.shape[0]

        # 1. Pseudo-labelling logits of the mix images (and of the weak view, with an EMA teacher), eval mode.
        labeller, labeller_fwd = (state.teacher, teacher_fwd) if self.ema else (state.student, student_fwd)
        labeller.eval()
        with torch.no_grad(), state.autocast():
            pred_eval = labeller_fwd(torch.cat([img_u_w_mix, img_u_w]) if self.ema else img_u_w_mix)["pred"]
        pred_u_w_mix = upsample(pred_eval[:n_u], size)

        # 2. Two strong views, each with its own CutMix box and mix images.
        boxes = [mixing.sample_mix_mask(n_u, *size, mode="cutmix", prob=self.mix_prob, generator=state.generator,
                                        device=state.device, gate=self.mix_gate) for _ in range(2)]
        mixes = [(img_u_s1_mix, pred_u_w_mix, gt_u_mix),
                 (img_u_s2_mix.roll(1, 0), pred_u_w_mix.roll(1, 0), gt_u_mix.roll(1, 0))]
        img_u_s = [state.memory_format(mixing.apply_mix(img, box, partner=m[0]))
                   for img, box, m in zip((img_u_s1, img_u_s2), boxes, mixes)]

        # 3. The student on labeled + weak (+ its feature-perturbed copy) + both strong views: one
        # forward, so that DDP sees each parameter used once per step.
        state.student.train()
        batch = torch.cat([img_x, img_u_w, *img_u_s])
        with state.autocast():
            out = student_fwd(batch, perturb=(n_x, n_x + n_u), dropout=self.fp_dropout) if self.fp else student_fwd(batch)
        loss_x = supervised_loss_of(out, n_x, mask_x, self.cfg, size)
        pred_u = upsample(out["pred"][n_x:], size)  # [weak, strong 1, strong 2]
        pred_u_w = upsample(pred_eval[n_u:], size) if self.ema else pred_u[:n_u].detach()

        # 4. Each unlabeled branch: (student logits, pseudo-labelling logits, ground truth, padding, weight);
        # padded pixels are pseudo-labelled and counted like any other here (no padding mask).
        branches = {f"s{i + 1}": (pred_u[n_u * (i + 1):n_u * (i + 2)], mixing.apply_mix(pred_u_w, box, partner=m[1]),
                                  mixing.apply_mix(gt_u, box, partner=m[2]), None, self.weight_strong)
                    for i, (box, m) in enumerate(zip(boxes, mixes))}
        if self.fp:
            branches["fp"] = (upsample(out["pred_fp"], size), pred_u_w, gt_u, None, self.weight_fp)

        # 5. Keep mask (fixed threshold, or S4MC), then the masked cross-entropy of each branch.
        total, metrics, _ = self.branch_losses(state, branches, loss_x, img_u_s[0], size)
        return StepLoss(total / 2, metrics, update_teacher=self.ema)

    def release_step(self, state, img_x, mask_x, unlabeled: dict) -> StepLoss:
        """One step as UniMatch's loop body (docs/method.md, "UniMatch release-exact")."""
        student_fwd, _ = state.forwards()
        size, ignore = mask_x.shape[-2:], self.s4mc.ignore_index
        n_x = img_x.shape[0]
        img_u_w, img_u_s1, img_u_s2, img_u_w_mix, img_u_s1_mix, img_u_s2_mix, gt_u, gt_u_mix = views(state, unlabeled)
        pad_u, pad_u_mix = state.to_device(unlabeled["padding"]), state.to_device(unlabeled["partner_padding"])
        n_u = img_u_w.shape[0]

        # 1. Pseudo-labelling logits of the mix images: eval mode, no gradient.
        state.student.eval()
        with torch.no_grad(), state.autocast():
            pred_u_w_mix = upsample(student_fwd(img_u_w_mix)["pred"], size)

        # 2. A box per image and view (UniMatch's distribution and per-image coin); both views of
        # image j paste from mix image j.
        boxes = [mixing.sample_mix_mask(n_u, *size, mode="cutmix", prob=self.mix_prob, generator=state.generator,
                                        device=state.device, gate="sample", box="unimatch") for _ in range(2)]
        img_u_s = [state.memory_format(mixing.apply_mix(img, box, partner=mix))
                   for img, box, mix in zip((img_u_s1, img_u_s2), boxes, (img_u_s1_mix, img_u_s2_mix))]

        # 3. Two training forwards, each its own BatchNorm batch: labeled + weak, with the FP copies
        # of both in the decoder's batch; then the two strong views.
        state.student.train()
        with state.autocast():
            img_x_w = torch.cat([img_x, img_u_w])
            out = (student_fwd(img_x_w, perturb=(0, n_x + n_u), dropout=self.fp_dropout) if self.fp
                   else student_fwd(img_x_w))
            out_s = student_fwd(torch.cat(img_u_s))
        loss_x = supervised_loss_of(out, n_x, mask_x, self.cfg, size)
        pred_u_w = upsample(out["pred"][n_x:], size).detach()  # training mode, batch statistics
        pred_u_s = upsample(out_s["pred"], size)

        # 4. Each branch: (student logits, pseudo-labelling logits, ground truth, padding, weight).
        branches = {f"s{i + 1}": (pred_u_s[n_u * i:n_u * (i + 1)], mixing.apply_mix(pred_u_w, box, partner=pred_u_w_mix),
                                  mixing.apply_mix(gt_u, box, partner=gt_u_mix),
                                  mixing.apply_mix(pad_u, box, partner=pad_u_mix), self.weight_strong)
                    for i, box in enumerate(boxes)}
        if self.fp:
            branches["fp"] = (upsample(out["pred_fp"][n_x:], size), pred_u_w, gt_u, pad_u, self.weight_fp)

        # 5. Kept pixels off the padding; each loss divided by the branch's non-padding pixels.
        total, metrics, targets = self.branch_losses(state, branches, loss_x, img_u_s[0], size)
        if "fp" in targets:  # UniMatch's logged mask ratio: the weak view's kept share of its non-padding pixels
            metrics["mask_ratio"] = ((targets["fp"] != ignore).sum() / (~pad_u).sum().clamp(min=1)).detach()
        return StepLoss(total / 2, metrics)

    def branch_losses(self, state, branches: dict, loss_x, visual_image, size) -> tuple:
        """(loss_x + the weighted unlabeled losses, metrics, each branch's target) over `branches`,
        {name: (student logits, pseudo-labelling logits, ground truth, padding or None, weight)}.

        Each loss is the cross-entropy summed over kept pixels and divided by all pixels, or, with a
        padding mask (release-exact), by the non-padded ones, which are then never kept either."""
        ignore = self.s4mc.ignore_index
        keep_percent = self.s4mc.keep_percent_at(state.epoch, state.iteration, state.iters_per_epoch)
        total, metrics = loss_x, {"loss_sup": loss_x.detach(), "keep_percent": torch.tensor(keep_percent)}
        targets = {}
        for name, (pred_student, pred_labeller, ground_truth, padding, weight) in branches.items():
            target, stats = self.pseudo_label_target(state, pred_labeller, ground_truth, keep_percent)
            if padding is None:
                loss = masked_ce_sum(pred_student, target, ignore) / target.numel()
            else:
                target = target.masked_fill(padding, ignore)
                loss = masked_ce_sum(pred_student, target, ignore) / (~padding).sum().clamp(min=1)
            total = total + weight * loss
            metrics[f"loss_{name}"] = loss.detach()
            targets[name] = target
            if name == "s1":
                metrics.update(stats)
                if state.capture_visuals:
                    state.visuals = visuals(visual_image, pred_labeller, target, ground_truth, size)
        return total, metrics, targets

    def pseudo_label_target(self, state, logits, ground_truth, keep_percent):
        """The hard pseudo-label with dropped pixels set to the ignore index, and its diagnostics."""
        if self.s4mc.refine:
            mask_u = logits.softmax(1).argmax(1)
            return self.s4mc.target(logits, mask_u, keep_percent, prior=state.prior,
                                    ground_truth=ground_truth, maps=state.indicator_maps)
        with torch.no_grad(), torch.autocast(logits.device.type, enabled=False):
            conf_u, mask_u = logits.float().softmax(1).max(1)
            keep = conf_u >= self.threshold
            target = mask_u.masked_fill(~keep, self.s4mc.ignore_index)
        return target, {"kept_fraction": keep.float().mean()}


def views(state, unlabeled: dict) -> tuple:
    """The unlabeled batch on the device: the weak view, both strong views, the same three of the
    `_mix` images that are pasted into the strong views (UniMatch's mix batch), and the ground
    truth of both (diagnostics only)."""
    images = (state.to_device(unlabeled[name], image=True) for name in
              ("image", "image_strong", "image_strong_2", "partner_image", "partner_image_strong", "partner_image_strong_2"))
    return (*images, state.to_device(unlabeled["label"]), state.to_device(unlabeled["partner_label"]))


def supervised_loss_of(out: dict, n_x: int, mask_x, cfg: dict, size) -> torch.Tensor:
    return supervised_loss({k: v[:n_x] for k, v in out.items() if k != "pred_fp"}, mask_x, cfg, size)
