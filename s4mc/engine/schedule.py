"""Learning-rate and keep-percent schedules (docs/method.md steps 5 and 10)."""

from __future__ import annotations



def poly_lr(base_lr: float, iteration: int, max_iters: int, power: float = 0.9) -> float:
    """U2PL's poly schedule, evaluated per iteration: base · (1 − it/max)^power."""
    return base_lr * (1.0 - iteration / max_iters) ** power


def set_lr(optimizer, iteration: int, max_iters: int, power: float) -> float:
    """Set every param group to its own base LR on the poly curve; return the backbone's."""
    for group in optimizer.param_groups:
        group["lr"] = poly_lr(group["initial_lr"], iteration, max_iters, power)
    return optimizer.param_groups[0]["lr"]


def ema_momentum(iteration: int, semi_start: int, ema_decay: float) -> float:
    """τ = min(1 − 1/(t − t0 + 1), ema_decay) (docs/method.md step 11): τ = 0 at t0, so the
    teacher starts as the student and averages over a growing window."""
    return min(1.0 - 1.0 / (iteration - semi_start + 1), ema_decay)


def keep_percent_at(epoch: int, epochs: int, start: float = 60.0, *, iteration: int | None = None,
                    iters_per_epoch: int | None = None) -> float:
    """Keep-percent kappa = 100 - (100 - kappa0)(1 - epoch/epochs) of docs/method.md step 5.

    The release steps it once per epoch (`epoch` counts from 0); give `iteration` and
    `iters_per_epoch` to move it smoothly within the epoch instead.
    """
    progress = float(epoch)
    if iteration is not None:
        progress += iteration / iters_per_epoch
    progress = min(max(progress / epochs, 0.0), 1.0)
    return 100.0 - (100.0 - start) * (1.0 - progress)
