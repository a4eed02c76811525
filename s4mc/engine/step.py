"""One S4MC training iteration, top to bottom (docs/method.md, "One semi-supervised iteration").

weak view → pseudo-label → mix → student → teacher → refine/threshold/mask → losses
→ optimizer step → EMA. The training loop and `benchmarks/train_step.py` both call
`train_step`, so what is benchmarked is what trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from s4mc import method, mixing
from s4mc.engine.contrastive_term import contrastive_term
from s4mc.engine.ema import copy_parameters, ema_update
from s4mc.engine.losses import supervised_loss
from s4mc.engine.schedule import ema_momentum, keep_percent_at, set_lr
from s4mc.engine.state import TrainState


def _upsample(logits: torch.Tensor, size) -> torch.Tensor:
    # fp32 before resizing: the softmax, percentile and refinement that follow must see fp32 values.
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=True)


@torch.no_grad()
def _visuals(state, images, teacher_logits, pseudo, gt, keep, cfg, size, count: int = 4) -> dict:
    """A few unlabeled samples for TensorBoard: image, teacher prediction, masked pseudo-label, ground truth."""
    unsup = cfg["trainer"]["unsupervised"]
    logits = _upsample(teacher_logits[:count], size)
    target, _ = method.pseudo_label_target(
        logits, pseudo[:count], keep, indicator=unsup["indicator"], neighbors=unsup["neighborhood_size"],
        k=unsup["num_neighbors"], prior=state.prior, refine=unsup["refine"], ignore_index=cfg["dataset"]["ignore_index"],
    )
    return {"image": images[:count].float().cpu(), "prediction": logits.argmax(1).cpu(),
            "pseudo_label": target.cpu(), "ground_truth": gt[:count].cpu()}


def train_step(state: TrainState, labeled: dict, unlabeled: dict | None, cfg: dict, partner: dict | None = None) -> dict:
    """Run one iteration and return its metrics as detached 0-dim device tensors.

    `unlabeled=None`, or an epoch before `trainer.sup_only_epoch`, trains on labeled data
    only. `partner` is a second unlabeled batch to mix with when the per-GPU batch is 1,
    so that no image is ever mixed with itself (a release bug).
    """
    tr, unsup = cfg["trainer"], cfg["trainer"]["unsupervised"]
    student, teacher = state.student, state.teacher
    student_fwd, teacher_fwd = state.forwards()
    x_l, y_l = state.to_device(labeled["image"], image=True), state.to_device(labeled["label"])
    size = y_l.shape[-2:]
    lr = set_lr(state.optimizer, state.iteration, state.max_iters, tr["lr_scheduler"]["kwargs"]["power"])
    semi = unlabeled is not None and state.epoch >= tr["sup_only_epoch"]
    metrics: dict[str, torch.Tensor] = {}

    if not semi:
        student.train()
        with state.autocast():
            out = student_fwd(x_l)
        loss_sup = supervised_loss(out, y_l, cfg, size)
        if unlabeled is not None:
            # Warm-up: train-mode teacher forwards warm its BN statistics (docs/method.md step 11).
            teacher.train()
            with torch.no_grad(), state.autocast():
                teacher_fwd(x_l)
        total = loss_sup
    else:
        if state.semi_start is None:
            copy_parameters(teacher, state.student_module)
            state.semi_start = state.iteration
        x_u = state.to_device(unlabeled["image"], image=True)
        use_strong = unsup["strong_aug"] and "image_strong" in unlabeled
        x_u_student = state.to_device(unlabeled["image_strong"], image=True) if use_strong else x_u
        gt_u = state.to_device(unlabeled["label"])
        n_u = x_u.shape[0]
        p_weak = p_student = p_gt = None
        if partner is not None:
            p_weak = state.to_device(partner["image"], image=True)
            p_student = state.to_device(partner["image_strong"], image=True) if use_strong else p_weak
            p_gt = state.to_device(partner["label"])

        # 1. Weak view: the eval-mode teacher's argmax is the hard pseudo-label ŷ.
        teacher.eval()
        with torch.no_grad():
            weak = x_u if partner is None else torch.cat([x_u, p_weak])
            with state.autocast():
                logits_weak = teacher_fwd(weak)["pred"]
            pseudo_all = _upsample(logits_weak, size).softmax(1).argmax(1)
        pseudo, p_pseudo = pseudo_all[:n_u], (pseudo_all[n_u:] if partner is not None else None)

        # 2. Strong view: mix images, pseudo-labels and ground truth with the same mask.
        mode, ignore = unsup["mixing"], cfg["dataset"]["ignore_index"]
        x_mix, x_mix_teacher = x_u_student, x_u
        if mode != "none":
            mask = mixing.sample_mix_mask(
                n_u, *size, mode=mode, prob=unsup["mix_prob"], generator=state.generator, device=state.device,
                pseudo_label=pseudo, partner_label=p_pseudo, ignore_index=ignore, gate=unsup["mix_gate"],
            )

            def mix(x, partner_x, fill):
                if mode == "cutout":
                    return mixing.apply_mix(x, mask, fill=fill)
                return mixing.apply_mix(x, mask, partner=partner_x)

            x_mix = mix(x_u_student, p_student, 0.0)
            x_mix_teacher = mix(x_u, p_weak, 0.0) if use_strong else x_mix
            pseudo, gt_u = mix(pseudo, p_pseudo, ignore), mix(gt_u, p_gt, ignore)
        if state.channels_last:
            x_mix = x_mix.contiguous(memory_format=torch.channels_last)
            x_mix_teacher = x_mix_teacher.contiguous(memory_format=torch.channels_last)

        # 3. Student on labeled + strong unlabeled, one forward.
        n_l = x_l.shape[0]
        student.train()
        with state.autocast():
            out = student_fwd(torch.cat([x_l, x_mix]))
        loss_sup = supervised_loss({k: v[:n_l] for k, v in out.items()}, y_l, cfg, size)

        # 4. Teacher again, train-mode BN as the release does, on the same mixed batch.
        teacher.train()
        with torch.no_grad(), state.autocast():
            out_t = teacher_fwd(torch.cat([x_l, x_mix_teacher]))

        # 5-8. Threshold on unrefined p, refine, mask, scaled CE (all fp32/fp64 inside).
        keep = keep_percent_at(
            state.epoch, tr["epochs"], unsup["keep_percent"],
            **({"iteration": state.iteration % state.iters_per_epoch, "iters_per_epoch": state.iters_per_epoch}
               if unsup["keep_schedule"] == "iteration" else {}),
        )
        loss_unsup, stats = method.pseudo_label_loss(
            _upsample(out["pred"][n_l:], size), _upsample(out_t["pred"][n_l:], size), pseudo, keep,
            indicator=unsup["indicator"], neighbors=unsup["neighborhood_size"], k=unsup["num_neighbors"],
            prior=state.prior, refine=unsup["refine"], ground_truth=gt_u, ignore_index=cfg["dataset"]["ignore_index"],
            maps=state.indicator_maps,
        )
        total = loss_sup + unsup["unsup_weight"] * loss_unsup
        if state.capture_visuals:
            state.visuals = _visuals(state, x_mix, out_t["pred"][n_l:], pseudo, gt_u, keep, cfg, size)
        metrics.update(loss_unsup=loss_unsup.detach(), keep_percent=torch.tensor(keep), **stats)

        # 9. Optional S4MC + U2PL contrastive term on `rep`.
        if cfg["trainer"]["contrastive"] is not None:
            loss_con, _ = contrastive_term(state, cfg, out, out_t, y_l, pseudo)
            total = total + loss_con  # already weighted by trainer.contrastive.loss_weight
            metrics["loss_contrastive"] = loss_con.detach()

    # 10. Optimiser step (GradScaler only for fp16).
    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler is not None:
        state.scaler.scale(total).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        total.backward()
        state.optimizer.step()

    # 11. EMA teacher, parameters only.
    if semi:
        tau = ema_momentum(state.iteration, state.semi_start, cfg["net"]["ema_decay"])
        ema_update(list(teacher.parameters()), list(state.student_module.parameters()), tau)

    # Recorded on the device, read by the loop when it logs: no synchronisation here.
    if state.first_nonfinite is None:
        state.first_nonfinite = torch.tensor(-1, device=total.device)
    bad = ~torch.isfinite(total.detach()) & (state.first_nonfinite < 0)
    state.first_nonfinite = torch.where(bad, state.iteration, state.first_nonfinite)
    state.iteration += 1
    metrics.update(loss=total.detach(), loss_sup=loss_sup.detach(), lr=torch.tensor(lr))
    return metrics
