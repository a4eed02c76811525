"""Glue between the training step and U2PL's contrastive term (docs/method.md step 9, S4MC + U2PL)."""

from __future__ import annotations

import torch

from s4mc.contrastive import ContrastiveMemory, ContrastiveSettings, all_gather_rows, contrastive_loss


def build_memory(cfg: dict, device: torch.device) -> tuple[ContrastiveMemory, ContrastiveSettings]:
    """The validated settings and the per-class negative bank; each rank draws from its own seeded stream."""
    settings = ContrastiveSettings.from_config(cfg["trainer"]["contrastive"])
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    memory = ContrastiveMemory(
        cfg["net"]["num_classes"], settings.memory_capacity, device=device, seed=cfg["seed"] + rank,
        gather=all_gather_rows if distributed else None,
    )
    return memory, settings


def contrastive_term(state, cfg: dict, out: dict, out_t: dict, label_l: torch.Tensor,
                     pseudo_label: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """U2PL's term on `rep`, weighted by `trainer.contrastive.loss_weight`.

    The teacher's probabilities come from its second (train-mode) forward at 1/4
    resolution, as in U2PL; the unlabeled labels are the mixed hard pseudo-labels ŷ
    before the S4MC mask, which the term partitions by entropy itself.
    """
    n_l = label_l.shape[0]
    with torch.no_grad(), torch.autocast(state.device.type, enabled=False):
        prob = out_t["pred"].float().softmax(1)
    epoch = state.iteration / state.iters_per_epoch
    loss, stats = contrastive_loss(
        out["rep"], out_t["rep"], prob[:n_l], prob[n_l:], label_l, pseudo_label, state.memory,
        state.contrastive, epoch, cfg["trainer"]["epochs"],
    )
    return loss, stats
