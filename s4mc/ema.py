"""EMA teacher (docs/method.md step 11): its momentum schedule and update, parameters only (BN
buffers stay the teacher's own) unless a method averages buffers too (UniMatch V2), and the
copies that start it."""

from __future__ import annotations

import torch


@torch.no_grad()
def copy_parameters(teacher: torch.nn.Module, student: torch.nn.Module) -> None:
    """Make the teacher's parameters a copy of the student's.

    The release assigned `t.data = s.data`, which aliased the tensors and froze
    the EMA for an epoch; copying keeps two independent sets of weights.
    """
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.copy_(s)


@torch.no_grad()
def copy_buffers(teacher: torch.nn.Module, student: torch.nn.Module) -> None:
    """Make the teacher's buffers (BN running statistics and counters) a copy of the student's."""
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


@torch.no_grad()
def ema_update(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], momentum: float) -> None:
    """teacher ← τ·teacher + (1 − τ)·student, as two fused multi-tensor ops."""
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)


@torch.no_grad()
def ema_update_buffers(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """UniMatch V2 averages the buffers as well: floating ones like the parameters; integer ones
    (BatchNorm's batch counter), which an average would truncate, are copied."""
    for t, s in zip(teacher.buffers(), student.buffers()):
        if t.is_floating_point():
            t.mul_(momentum).add_(s, alpha=1.0 - momentum)
        else:
            t.copy_(s)


def ema_momentum(iteration: int, semi_start: int, ema_decay: float) -> float:
    """τ = min(1 − 1/(t − t0 + 1), ema_decay) (docs/method.md step 11): τ = 0 at t0, so the
    teacher starts as the student and averages over a growing window."""
    return min(1.0 - 1.0 / (iteration - semi_start + 1), ema_decay)
