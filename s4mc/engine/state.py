"""Everything a training step reads and changes, in one object."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from s4mc.distributed import DistInfo


@dataclass
class TrainState:
    student: nn.Module  # possibly wrapped in DistributedDataParallel
    teacher: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    max_iters: int  # length of the poly schedule: epochs × iterations per epoch
    iters_per_epoch: int
    generator: torch.Generator  # mixing randomness; seeded per rank so ranks draw different boxes
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    channels_last: bool = False
    prior: torch.Tensor | None = None  # neighbour prior E_c on the device
    method: object | None = None  # the training method (s4mc.methods), built once from the config
    terms: dict = field(default_factory=dict)  # name -> additive loss term (s4mc.terms), in config order
    dist: DistInfo = field(default_factory=DistInfo)
    epoch: int = 0
    iteration: int = 0  # global iteration count, across epochs
    semi_start: int | None = None  # t0 of the EMA schedule, set on the first semi-supervised step
    best_miou: float = 0.0
    history: list = field(default_factory=list)  # every logged window's metrics, kept across resumes
    # First iteration whose loss was not finite, kept on the device so the step never
    # synchronises; the loop reads it when it logs or saves (counted from 1 as the log counts; -1 = none yet).
    first_nonfinite: torch.Tensor | None = None
    capture_visuals: bool = False  # the loop sets it on iterations that log images
    visuals: dict | None = None
    # torch.compile'd callables for the step's forwards (trainer.compile). They share the
    # modules' parameters; evaluation and checkpoints use the plain modules, so a compiled
    # run never recompiles for the varying image sizes of whole-image evaluation.
    student_forward: object | None = None
    teacher_forward: object | None = None
    indicator_maps: object | None = None  # compiled method.indicator_maps, passed as the loss's `maps`

    @property
    def student_module(self) -> nn.Module:
        return getattr(self.student, "module", self.student)

    def forwards(self) -> tuple:
        """The callables the step runs student and teacher through (compiled or plain)."""
        student = self.student if self.student_forward is None else self.student_forward
        teacher = self.teacher if self.teacher_forward is None else self.teacher_forward
        return student, teacher

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def memory_format(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.contiguous(memory_format=torch.channels_last) if self.channels_last else tensor

    def to_device(self, tensor: torch.Tensor, image: bool = False) -> torch.Tensor:
        tensor = tensor.to(self.device, non_blocking=True)
        if image and self.channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor
