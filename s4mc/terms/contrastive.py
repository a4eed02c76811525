"""U2PL's contrastive term as a plug-in (docs/method.md step 9, "S4MC + U2PL").

The loss and its settings live in s4mc/terms/contrastive_loss.py; this file is what the training
step needs from it: a builder from `trainer.terms.contrastive` (or the release's
`trainer.contrastive`), the per-class negative bank as the term's state, and the one metric it logs.
"""

from __future__ import annotations

import torch

from s4mc.terms.base import TermInputs, register_term
from s4mc.terms.contrastive_loss import SETTINGS, ContrastiveMemory, ContrastiveSettings, all_gather_rows, contrastive_loss


def check_ranks(block: dict, fail) -> None:
    if block["high_rank"] <= block["low_rank"]:
        fail("high_rank", f"= {block['high_rank']} must be greater than low_rank ({block['low_rank']})")


@register_term("contrastive", schema=SETTINGS, legacy_key="contrastive", needs_rep=True, check=check_ranks)
class ContrastiveTerm:
    @staticmethod
    def describe(block: dict) -> str:
        mode = ", release-exact" if block["release_exact"] else ""
        return f"U2PL contrastive (weight {block['loss_weight']:g}, {block['num_queries']} queries{mode})"

    def __init__(self, block: dict, cfg: dict, device: torch.device):
        self.settings = ContrastiveSettings.from_config(block)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        # Each rank draws negatives from its own seeded stream.
        self.memory = ContrastiveMemory(
            cfg["net"]["num_classes"], self.settings.memory_capacity, device=device, seed=cfg["seed"] + rank,
            gather=all_gather_rows if distributed else None,
        )

    def __call__(self, state, inputs: TermInputs) -> tuple[torch.Tensor, dict]:
        """The term on `rep`, already weighted by its loss_weight.

        The teacher's probabilities come from its train-mode forward on the same images, at
        1/4 resolution as in U2PL; the unlabeled labels are the hard pseudo-labels before the
        S4MC mask, which the term partitions by entropy itself.
        """
        n_l = inputs.labeled_label.shape[0]
        with torch.no_grad(), torch.autocast(state.device.type, enabled=False):
            prob = inputs.teacher["pred"].float().softmax(1)
        epoch = state.iteration / state.iters_per_epoch
        loss, _ = contrastive_loss(
            inputs.student["rep"], inputs.teacher["rep"], prob[:n_l], prob[n_l:], inputs.labeled_label,
            inputs.pseudo_label, self.memory, self.settings, epoch, inputs.epochs,
        )
        return loss, {"loss_contrastive": loss.detach()}

    def state_dict(self) -> dict:
        return self.memory.state_dict()

    def load_state_dict(self, saved: dict) -> None:
        self.memory.load_state_dict(saved)
