"""UniMatch V2 (Yang, Zhao, Zhao, 2024), and S4MC on top of it (docs/method.md, "UniMatch V2").

Per step, after the release's loop body:

- the EMA teacher (eval mode) labels the weak view: confidence `conf_u_w`, class `mask_u_w`;
- each strong view gets its own CutMix box, pasted from the batch reversed (`flip(0)`), and so
  do the teacher's labels, confidences and the ignore mask;
- the student sees the labeled images and both strong views in one forward, with Complementary
  Dropout on the strong views' encoder features (`comp_drop`, s4mc/models/dpt.py);
- loss `(L_x + (L_s1 + L_s2) / 2) / 2`, each unlabeled term the cross-entropy summed over the
  kept pixels (fp32) and divided by the count of non-ignored pixels of the mixed ignore mask;
- after the optimizer step the teacher takes an EMA step, buffers included, with
  τ = min(1 − 1/(t − t0 + 1), net.ema_decay) (0.996 in the configs).

Which pixels are kept is the only thing S4MC changes: `trainer.unsupervised.refine: false` keeps
those whose teacher confidence reaches `trainer.unimatch_v2.threshold` (0.95); `refine: true`
keeps those that S4MC's neighbour refinement and dynamic threshold keep, on both strong views.

The loaders mark each unlabeled crop's padded border (`padding`, s4mc/data/loaders.py), which is
UniMatch V2's `ignore_mask`: padded pixels are never pseudo-labelled and each unlabeled loss is
divided by the non-padded count, as in the release. A batch may also carry the release's own
`ignore_mask` (255: padding) and `cutmix_box1/2` (1: paste); the golden test passes recorded ones.
"""

from __future__ import annotations

import math

import torch

from s4mc import mixing
from s4mc.errors import ConfigError
from s4mc.losses import masked_ce_sum, supervised_loss
from s4mc.methods.base import StepLoss, begin_semi_phase, register_method, supervised_step, upsample, visuals
from s4mc.pseudo_label import S4MCSettings, describe_selection
from s4mc.schema import NUM, key

# `trainer.unimatch_v2`; the defaults are UniMatch V2's.
SETTINGS = {
    "threshold": key(0.95, *NUM, low=0, high=1),  # fixed confidence threshold, used when unsupervised.refine is false
    # Complementary Dropout on the strong views (false: a plain forward, an ablation; also what a
    # DeepLabv3+ model needs, which has no comp_drop).
    "comp_drop": key(True, bool),
}
PADDING = 255  # UniMatch V2's ignore-mask value for padded pixels

# UniMatch's CutMix box: with probability p, an area of 2-40% of the image with an aspect ratio
# in (0.3, 1/0.3), placed where it fits (docs/method.md, "UniMatch V2").
BOX_AREA = (0.02, 0.4)
BOX_RATIO = (0.3, 1 / 0.3)


def sample_boxes(n: int, height: int, width: int, prob: float, generator: torch.Generator, device) -> torch.Tensor:
    """bool [n, H, W]: one UniMatch CutMix box per image, or none (probability 1 − prob)."""
    boxes = torch.zeros(n, height, width, dtype=torch.bool)

    def uniform(low, high):
        return low + (high - low) * float(torch.rand((), generator=generator))

    for i in range(n):
        if float(torch.rand((), generator=generator)) >= prob:
            continue
        area = uniform(*BOX_AREA) * height * width
        while True:
            ratio = uniform(*BOX_RATIO)
            w, h = int(math.sqrt(area / ratio)), int(math.sqrt(area * ratio))
            x = int(torch.randint(0, width, (), generator=generator))
            y = int(torch.randint(0, height, (), generator=generator))
            if x + w <= width and y + h <= height:
                break
        boxes[i, y:y + h, x:x + w] = True
    return boxes.to(device)


@register_method("unimatch_v2", schema=SETTINGS)
class UniMatchV2:
    supports_terms = False  # terms see one student/teacher pair; this method has two strong branches
    ema_buffers = True  # the EMA averages buffers too (s4mc/engine/step.py)
    lr_lag = 1  # the release sets the poly LR after its optimizer step (s4mc/engine/step.py)
    evaluates_student = True  # student and teacher are evaluated, best.pth by the teacher (s4mc/engine/loop.py)

    def __init__(self, cfg: dict):
        self.cfg = cfg
        settings, unsup = cfg["trainer"]["unimatch_v2"], cfg["trainer"]["unsupervised"]
        self.s4mc = S4MCSettings.from_config(cfg)
        self.threshold, self.comp_drop = settings["threshold"], settings["comp_drop"]
        self.mix_prob = unsup["mix_prob"]
        self.sup_only_epoch = cfg["trainer"]["sup_only_epoch"]
        if self.comp_drop and cfg["net"]["decoder"]["type"] != "dpt":
            raise ConfigError("trainer.unimatch_v2.comp_drop: Complementary Dropout needs the DINOv2 + DPT model "
                              "(net.decoder.type: dpt); set trainer.unimatch_v2.comp_drop: false for another model")

    @classmethod
    def strong_views(cls, cfg: dict) -> int:
        return 2

    @classmethod
    def needs_partner(cls, cfg: dict) -> bool:
        return False  # CutMix partners come from the same batch, reversed

    @classmethod
    def padding_mask(cls, cfg: dict) -> bool:
        return True  # the release's ignore_mask: unlabeled padding is neither kept nor counted

    @classmethod
    def describe(cls, cfg: dict) -> str:
        s = cfg["trainer"]["unimatch_v2"]
        selection = (describe_selection(cfg) if cfg["trainer"]["unsupervised"]["refine"]
                     else f"fixed confidence threshold {s['threshold']:g}")
        drop = "Complementary Dropout" if s["comp_drop"] else "no Complementary Dropout"
        return (f"UniMatch V2 (EMA teacher, decay {cfg['net']['ema_decay']:g}, buffers averaged too), {selection}, "
                f"two strong views CutMixed with the reversed batch, {drop}; student and teacher evaluated, "
                f"best.pth by the teacher")

    def loss(self, state, labeled: dict, unlabeled: dict | None) -> StepLoss:
        img_x, mask_x = state.to_device(labeled["image"], image=True), state.to_device(labeled["label"])
        if unlabeled is None or state.epoch < self.sup_only_epoch:
            return supervised_step(state, img_x, mask_x, self.cfg,
                                   warm_teacher_on=img_x if unlabeled is not None else None)
        return self.semi_step(state, img_x, mask_x, unlabeled)

    def semi_step(self, state, img_x, mask_x, unlabeled: dict) -> StepLoss:
        begin_semi_phase(state, self.cfg)
        student_fwd, teacher_fwd = state.forwards()
        size, ignore = mask_x.shape[-2:], self.s4mc.ignore_index
        img_u_w, img_u_s1, img_u_s2 = (state.to_device(unlabeled[name], image=True)
                                       for name in ("image", "image_strong", "image_strong_2"))
        n_x, n_u = img_x.shape[0], img_u_w.shape[0]
        gt_u = state.to_device(unlabeled["label"]) if "label" in unlabeled else None
        if "ignore_mask" in unlabeled:
            ignore_mask = state.to_device(unlabeled["ignore_mask"]).long()
        elif "padding" in unlabeled:
            ignore_mask = state.to_device(unlabeled["padding"]).long() * PADDING
        else:
            ignore_mask = torch.zeros(n_u, *size, dtype=torch.long, device=state.device)
        boxes = [state.to_device(unlabeled[name]).bool() if name in unlabeled else
                 sample_boxes(n_u, *size, self.mix_prob, state.generator, state.device)
                 for name in ("cutmix_box1", "cutmix_box2")]

        # 1. The teacher labels the weak view (eval mode).
        state.teacher.eval()
        with torch.no_grad():
            with state.autocast():
                pred_u_w = teacher_fwd(img_u_w)["pred"]
            pred_u_w = upsample(pred_u_w, size)
            conf_u_w, mask_u_w = pred_u_w.softmax(1).max(1)

        # 2. Each strong view pastes its box from the reversed batch.
        img_u_s = [state.memory_format(mixing.apply_mix(img, box, partner=img.flip(0)))
                   for img, box in zip((img_u_s1, img_u_s2), boxes)]

        # 3. The student on labeled + both strong views, one forward (each parameter once for DDP).
        state.student.train()
        batch = torch.cat([img_x, *img_u_s])
        with state.autocast():
            out = (student_fwd(batch, comp_drop=(n_x, n_x + 2 * n_u), generator=state.generator)
                   if self.comp_drop else student_fwd(batch))
        loss_x = supervised_loss({"pred": out["pred"][:n_x]}, mask_x, self.cfg, size)
        pred_u_s = upsample(out["pred"][n_x:], size).split(n_u)

        # 4. Keep mask (fixed threshold, or S4MC) of each view, then its masked cross-entropy.
        valid = ignore_mask != PADDING
        mask_ratio = ((conf_u_w >= self.threshold) & valid).sum() / valid.sum().clamp(min=1)
        keep_percent = self.s4mc.keep_percent_at(state.epoch, state.iteration, state.iters_per_epoch)
        metrics = {"loss_sup": loss_x.detach(), "mask_ratio": mask_ratio}
        if self.s4mc.refine:
            metrics["keep_percent"] = torch.tensor(keep_percent)
        losses = []
        for i, (box, pred_s) in enumerate(zip(boxes, pred_u_s)):
            def pasted(t, box=box):
                return mixing.apply_mix(t, box, partner=t.flip(0))

            valid_mixed = pasted(ignore_mask) != PADDING
            gt_mixed = pasted(gt_u) if gt_u is not None else None
            target, stats = self.pseudo_label_target(state, pasted(pred_u_w), pasted(conf_u_w), pasted(mask_u_w),
                                                     valid_mixed, gt_mixed, keep_percent)
            loss = masked_ce_sum(pred_s, target, ignore) / valid_mixed.sum().clamp(min=1)
            losses.append(loss)
            metrics[f"loss_s{i + 1}"] = loss.detach()
            if i == 0:
                metrics.update(stats)
                if state.capture_visuals and gt_mixed is not None:
                    state.visuals = visuals(img_u_s[0], pasted(pred_u_w), target, gt_mixed, size)
        total = (loss_x + (losses[0] + losses[1]) / 2) / 2
        return StepLoss(total, metrics, update_teacher=True)

    def pseudo_label_target(self, state, logits, conf, label, valid, ground_truth, keep_percent):
        """The hard pseudo-label, ignore index where dropped or padded, and its diagnostics."""
        ignore = self.s4mc.ignore_index
        if self.s4mc.refine:
            return self.s4mc.target(logits, label.masked_fill(~valid, ignore), keep_percent, prior=state.prior,
                                    ground_truth=ground_truth, maps=state.indicator_maps)
        keep = (conf >= self.threshold) & valid
        return label.masked_fill(~keep, ignore), {"kept_fraction": keep.sum() / valid.sum().clamp(min=1)}
