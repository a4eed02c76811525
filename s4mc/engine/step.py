"""One training iteration: the method's loss, the optimizer step, the EMA teacher.

What the loss is belongs to the training method (`trainer.method`, s4mc/methods/); this
function is the same for all of them. The training loop and `benchmarks/train_step.py` both
call `train_step`, so what is benchmarked is what trains.
"""

from __future__ import annotations

import contextlib

import torch

from s4mc.ema import ema_momentum, ema_update, ema_update_buffers
from s4mc.engine.optim import set_lr
from s4mc.engine.state import TrainState


def train_step(state: TrainState, micro_batches: list, cfg: dict) -> dict:
    """One optimizer step over `micro_batches` [(labeled, unlabeled), ...]: one pair, or
    `trainer.accumulate` of them. Returns its metrics as detached 0-dim device tensors.

    `unlabeled=None` trains on labeled data only. A partner batch, when the method needs
    one, is already inside `unlabeled` (s4mc/engine/batches.py). Every micro-batch does the
    method's full work (teacher forwards, mixing, S4MC mask); the gradients of loss / N add up,
    then one optimizer step, one EMA update and one LR step. `state.iteration` counts optimizer
    steps. Metrics are the micro-batches' mean.
    """
    n = len(micro_batches)
    # A method may step with the LR of the previous iteration's point on the poly curve, as UniMatch
    # and UniMatch V2 set the LR after their optimizer step (`lr_lag = 1`; docs/method.md, "UniMatch
    # release-exact", item 6).
    lag = getattr(state.method, "lr_lag", 0)
    lr = set_lr(state.optimizer, max(state.iteration - lag, 0), state.max_iters,
                cfg["trainer"]["lr_scheduler"]["kwargs"]["power"])
    state.optimizer.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}
    update_teacher = False
    for i, (labeled, unlabeled) in enumerate(micro_batches):
        # DDP all-reduces gradients only on the last micro-batch's backward.
        sync = i == n - 1 or not hasattr(state.student, "no_sync")
        with contextlib.nullcontext() if sync else state.student.no_sync():
            step = state.method.loss(state, labeled, unlabeled)
            total = step.total if n == 1 else step.total / n
            if state.scaler is not None:
                state.scaler.scale(total).backward()
            else:
                total.backward()
        update_teacher = update_teacher or step.update_teacher
        _record_nonfinite(state, step.total)
        for key, value in {**step.metrics, "loss": step.total.detach()}.items():
            sums[key] = sums[key] + value if key in sums else value
    # Optimiser step (GradScaler only for fp16).
    if state.scaler is not None:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()

    # EMA teacher: parameters, and buffers for a method that averages them (`ema_buffers`).
    if update_teacher:
        tau = ema_momentum(state.iteration, state.semi_start, cfg["net"]["ema_decay"])
        ema_update(list(state.teacher.parameters()), list(state.student_module.parameters()), tau)
        if getattr(state.method, "ema_buffers", False):
            ema_update_buffers(state.teacher, state.student_module, tau)
    state.iteration += 1
    metrics = sums if n == 1 else {k: v / n for k, v in sums.items()}
    return {**metrics, "lr": torch.tensor(lr)}


def _record_nonfinite(state: TrainState, total: torch.Tensor) -> None:
    # Recorded on the device, read by the loop when it logs: no synchronisation here. The step
    # being computed is iteration `state.iteration + 1`, as the log counts (from 1).
    if state.first_nonfinite is None:
        state.first_nonfinite = torch.tensor(-1, device=total.device)
    bad = ~torch.isfinite(total.detach()) & (state.first_nonfinite < 0)
    state.first_nonfinite = torch.where(bad, state.iteration + 1, state.first_nonfinite)
