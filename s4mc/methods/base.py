"""What every training method shares: the registry, the step's result, and the pieces of a
step that more than one method uses (the supervised step, the teacher's start, upsampling).

A method class has:

- `__init__(self, cfg)`: read what it needs from the validated config, once;
- `loss(self, state, labeled, unlabeled) -> StepLoss`;
- `strong_views(cfg) -> int` (class method): how many strong photometric views of each
  unlabeled image the data loader makes (0, 1 or 2: `image_strong`, `image_strong_2`);
- `needs_partner(cfg) -> bool` (class method): whether every unlabeled batch comes with a
  partner batch (`partner_image`, `partner_label`, ... keys), drawn from a second pass over
  the unlabeled set (s4mc/engine/batches.py);
- `describe(cfg) -> str` (class method, optional): the run header's line for the method;
- `check_config(cfg, fail)` (class method, optional): checks spanning the method's block and
  other keys, reported through `fail(dotted_key, message)` when the config is loaded;
- `padding_mask(cfg) -> bool` (class method, optional): unlabeled items (and partners) carry
  `padding`, true on the crop's padded border;
- `partner_same_images(cfg) -> bool` (class method, optional): the partner pass visits the
  unlabeled pass's images in its order, each augmented afresh, instead of a reshuffle;
- `lr_lag` (attribute, optional, default 0): 1 sets the poly LR after the optimizer step, as
  UniMatch and UniMatch V2 do, so iteration k steps with lr(k - 1) (s4mc/engine/step.py);
- `ema_buffers` (attribute, optional): the EMA averages the teacher's buffers too (UniMatch V2);
- `evaluates_student` (attribute, optional): the student is evaluated beside the teacher.

`register_method(name, schema=...)` adds it; the schema (s4mc.schema Keys) is the method's own
config block, `trainer.<name>`, validated and defaulted by the config loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from s4mc.ema import copy_buffers, copy_parameters
from s4mc.losses import supervised_loss

METHODS: dict[str, type] = {}


def register_method(name: str, *, schema: dict | None = None):
    """Class decorator adding a training method to METHODS under `name`, with its settings block."""
    def add(cls):
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"a training method named {name!r} is already registered")
        METHODS[name] = cls
        cls.name = name
        cls.schema = schema
        return cls
    return add


def describe_method(cfg: dict) -> str:
    """The header's line for the configured method: its own `describe`, else its name."""
    cls = method_class(cfg)
    describe = getattr(cls, "describe", None)
    return describe(cfg) if describe is not None else f"method {cls.name}"


@dataclass
class StepLoss:
    total: torch.Tensor  # what the optimizer minimises
    metrics: dict = field(default_factory=dict)  # detached 0-dim tensors, logged as they are named
    update_teacher: bool = False  # take an EMA step of the teacher after the optimizer step


def method_class(cfg: dict) -> type:
    return METHODS[cfg["trainer"]["method"]]


def build_method(cfg: dict):
    return method_class(cfg)(cfg)


def upsample(logits: torch.Tensor, size) -> torch.Tensor:
    # fp32 before resizing: the softmax, percentile and refinement that follow must see fp32 values.
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=True)


def supervised_step(state, img_x, mask_x, cfg, warm_teacher_on=None) -> StepLoss:
    """Labeled data only: `trainer.mode: sup`, or the warm-up epochs before `trainer.sup_only_epoch`."""
    student_fwd, teacher_fwd = state.forwards()
    state.student.train()
    with state.autocast():
        out = student_fwd(img_x)
    loss_x = supervised_loss(out, mask_x, cfg, mask_x.shape[-2:])
    if warm_teacher_on is not None:
        # Warm-up: train-mode teacher forwards warm its BN statistics (docs/method.md step 11).
        state.teacher.train()
        with torch.no_grad(), state.autocast():
            teacher_fwd(warm_teacher_on)
    return StepLoss(loss_x, {"loss_sup": loss_x.detach()})


def begin_semi_phase(state, cfg: dict) -> None:
    """On the first semi-supervised step the teacher starts as a copy of the student (EMA t0):
    its parameters, and with `trainer.teacher_start: all` its BN statistics too."""
    if state.semi_start is None:
        copy_parameters(state.teacher, state.student_module)
        if cfg["trainer"]["teacher_start"] == "all":
            copy_buffers(state.teacher, state.student_module)
        state.semi_start = state.iteration


@torch.no_grad()
def visuals(images, teacher_logits, target, ground_truth, size, count: int = 4) -> dict:
    """A few unlabeled samples for TensorBoard: image, teacher prediction, masked pseudo-label, ground truth."""
    return {"image": images[:count].float().cpu(), "prediction": upsample(teacher_logits[:count], size).argmax(1).cpu(),
            "pseudo_label": target[:count].cpu(), "ground_truth": ground_truth[:count].cpu()}
