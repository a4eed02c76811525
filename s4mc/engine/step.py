"""One training iteration: the method's loss, the optimizer step, the EMA teacher.

What the loss is belongs to the training method (`trainer.method`, s4mc/methods/); this
function is the same for all of them. The training loop and `benchmarks/train_step.py` both
call `train_step`, so what is benchmarked is what trains.
"""

from __future__ import annotations

import torch

from s4mc.engine.ema import ema_update
from s4mc.engine.schedule import ema_momentum, set_lr
from s4mc.engine.state import TrainState


def train_step(state: TrainState, labeled: dict, unlabeled: dict | None, cfg: dict) -> dict:
    """Run one iteration and return its metrics as detached 0-dim device tensors.

    `unlabeled=None` trains on labeled data only. A partner batch, when the method needs
    one, is already inside `unlabeled` (s4mc/engine/batches.py).
    """
    lr = set_lr(state.optimizer, state.iteration, state.max_iters, cfg["trainer"]["lr_scheduler"]["kwargs"]["power"])
    step = state.method.loss(state, labeled, unlabeled)
    total = step.total

    # Optimiser step (GradScaler only for fp16).
    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler is not None:
        state.scaler.scale(total).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        total.backward()
        state.optimizer.step()

    # EMA teacher, parameters only.
    if step.update_teacher:
        tau = ema_momentum(state.iteration, state.semi_start, cfg["net"]["ema_decay"])
        ema_update(list(state.teacher.parameters()), list(state.student_module.parameters()), tau)

    # Recorded on the device, read by the loop when it logs: no synchronisation here.
    if state.first_nonfinite is None:
        state.first_nonfinite = torch.tensor(-1, device=total.device)
    bad = ~torch.isfinite(total.detach()) & (state.first_nonfinite < 0)
    state.first_nonfinite = torch.where(bad, state.iteration, state.first_nonfinite)
    state.iteration += 1
    return {**step.metrics, "loss": total.detach(), "lr": torch.tensor(lr)}
