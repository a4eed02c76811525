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
  summed over the kept pixels and divided by all pixels.

Which pixels are kept is the only thing S4MC changes: `trainer.unsupervised.refine: false`
keeps those whose confidence reaches the fixed threshold (0.95); `refine: true` keeps those
that S4MC's neighbour refinement and dynamic (keep-percent) threshold keep, on every branch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from s4mc import mixing
from s4mc.engine.losses import supervised_loss
from s4mc.method import S4MCSettings
from s4mc.methods import StepLoss, register_method
from s4mc.methods.mean_teacher import begin_semi_phase, supervised_step, upsample, visuals


@register_method("unimatch")
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

    @classmethod
    def strong_views(cls, cfg: dict) -> int:
        return 2

    @classmethod
    def needs_partner(cls, cfg: dict) -> bool:
        # Mix partners come from a second pass over the unlabeled set, as UniMatch's mix loader.
        return True

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
        x_l, y_l = state.to_device(labeled["image"], image=True), state.to_device(labeled["label"])
        if unlabeled is None or state.epoch < self.sup_only_epoch:
            warm = x_l if unlabeled is not None and self.ema else None
            return supervised_step(state, x_l, y_l, self.cfg, warm_teacher_on=warm)
        return self.semi_step(state, x_l, y_l, unlabeled)

    def semi_step(self, state, x_l, y_l, unlabeled: dict) -> StepLoss:
        if self.ema:
            begin_semi_phase(state, self.cfg)
        student_fwd, teacher_fwd = state.forwards()
        size, ignore = y_l.shape[-2:], self.s4mc.ignore_index
        n_l = x_l.shape[0]
        weak, strong_1, strong_2, partner_weak, partner_1, partner_2 = (
            state.to_device(unlabeled[key], image=True) for key in
            ("image", "image_strong", "image_strong_2", "partner_image", "partner_image_strong", "partner_image_strong_2"))
        gt, partner_gt = state.to_device(unlabeled["label"]), state.to_device(unlabeled["partner_label"])
        n_u = weak.shape[0]

        # 1. Pseudo-labelling logits of the partners (and of the weak view, with an EMA teacher), eval mode.
        labeller, labeller_fwd = (state.teacher, teacher_fwd) if self.ema else (state.student, student_fwd)
        labeller.eval()
        with torch.no_grad(), state.autocast():
            labelled = labeller_fwd(torch.cat([partner_weak, weak]) if self.ema else partner_weak)["pred"]
        partner_logits = upsample(labelled[:n_u], size)

        # 2. Two strong views, each with its own CutMix box and partner.
        boxes = [mixing.sample_mix_mask(n_u, *size, mode="cutmix", prob=self.mix_prob, generator=state.generator,
                                        device=state.device, gate=self.mix_gate) for _ in range(2)]
        partners = [(partner_1, partner_logits, partner_gt),
                    (partner_2.roll(1, 0), partner_logits.roll(1, 0), partner_gt.roll(1, 0))]
        x_s = [state.memory_format(mixing.apply_mix(x, box, partner=p[0]))
               for x, box, p in zip((strong_1, strong_2), boxes, partners)]

        # 3. The student on labeled + weak (+ its feature-perturbed copy) + both strong views: one
        # forward, so that DDP sees each parameter used once per step.
        state.student.train()
        batch = torch.cat([x_l, weak, *x_s])
        with state.autocast():
            out = student_fwd(batch, perturb=(n_l, n_l + n_u), dropout=self.fp_dropout) if self.fp else student_fwd(batch)
        loss_x = supervised_loss_of(out, n_l, y_l, self.cfg, size)
        pred = upsample(out["pred"][n_l:], size)
        weak_logits = upsample(labelled[n_u:], size) if self.ema else pred[:n_u].detach()

        # 4. Each unlabeled branch: (student logits, pseudo-labelling logits, ground truth, weight).
        branches = {f"s{i + 1}": (pred[n_u * (i + 1):n_u * (i + 2)], mixing.apply_mix(weak_logits, box, partner=p[1]),
                                  mixing.apply_mix(gt, box, partner=p[2]), self.weight_strong)
                    for i, (box, p) in enumerate(zip(boxes, partners))}
        if self.fp:
            branches["fp"] = (upsample(out["pred_fp"], size), weak_logits, gt, self.weight_fp)

        # 5. Keep mask (fixed threshold, or S4MC), then the masked cross-entropy of each branch.
        keep_percent = self.s4mc.keep_percent_at(state.epoch, state.iteration, state.iters_per_epoch)
        total, metrics = loss_x, {"loss_sup": loss_x.detach(), "keep_percent": torch.tensor(keep_percent)}
        for name, (student_logits, logits, ground_truth, weight) in branches.items():
            target, stats = self.pseudo_label_target(state, logits, ground_truth, keep_percent)
            loss = masked_cross_entropy(student_logits, target, ignore)
            total = total + weight * loss
            metrics[f"loss_{name}"] = loss.detach()
            if name == "s1":
                metrics.update(stats)
                if state.capture_visuals:
                    state.visuals = visuals(x_s[0], logits, target, ground_truth, size)
        return StepLoss(total / 2, metrics, update_teacher=self.ema)

    def pseudo_label_target(self, state, logits, ground_truth, keep_percent):
        """The hard pseudo-label with dropped pixels set to the ignore index, and its diagnostics."""
        if self.s4mc.refine:
            pseudo_label = logits.softmax(1).argmax(1)
            return self.s4mc.target(logits, pseudo_label, keep_percent, prior=state.prior,
                                    ground_truth=ground_truth, maps=state.indicator_maps)
        with torch.no_grad(), torch.autocast(logits.device.type, enabled=False):
            confidence, pseudo_label = logits.float().softmax(1).max(1)
            keep = confidence >= self.threshold
            target = pseudo_label.masked_fill(~keep, self.s4mc.ignore_index)
        return target, {"kept_fraction": keep.float().mean()}


def supervised_loss_of(out: dict, n_l: int, y_l, cfg: dict, size) -> torch.Tensor:
    return supervised_loss({k: v[:n_l] for k, v in out.items() if k != "pred_fp"}, y_l, cfg, size)


def masked_cross_entropy(student_logits, target, ignore_index: int) -> torch.Tensor:
    """UniMatch's unlabeled loss: cross-entropy summed over kept pixels, divided by all pixels (fp32)."""
    with torch.autocast(student_logits.device.type, enabled=False):
        ce = F.cross_entropy(student_logits.float(), target, ignore_index=ignore_index, reduction="sum")
    return ce / target.numel()
