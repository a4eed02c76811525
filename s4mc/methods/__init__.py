"""Training methods: a registry of name → method class (`trainer.method`).

A method turns one batch into a loss. `s4mc.engine.step.train_step` calls
`method.loss(state, labeled, unlabeled)`, steps the optimizer, and updates the EMA teacher
when the method asks for it; the loop, checkpoints and logs never look further.

A method class has:

- `__init__(self, cfg)`: read what it needs from the validated config, once;
- `loss(self, state, labeled, unlabeled) -> StepLoss`;
- `strong_views(cfg) -> int` (class method): how many strong photometric views of each
  unlabeled image the data loader makes (0, 1 or 2: `image_strong`, `image_strong_2`);
- `needs_partner(cfg) -> bool` (class method): whether every unlabeled batch comes with a
  partner batch (`partner_image`, `partner_label`, ... keys), drawn from a second pass over
  the unlabeled set (s4mc/engine/batches.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

METHODS: dict[str, type] = {}


def register_method(name: str):
    """Class decorator adding a training method to METHODS under `name`."""
    def add(cls):
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"a training method named {name!r} is already registered")
        METHODS[name] = cls
        cls.name = name
        return cls
    return add


@dataclass
class StepLoss:
    total: torch.Tensor  # what the optimizer minimises
    metrics: dict = field(default_factory=dict)  # detached 0-dim tensors, logged as they are named
    update_teacher: bool = False  # take an EMA step of the teacher after the optimizer step


def method_class(cfg: dict) -> type:
    return METHODS[cfg["trainer"]["method"]]


def build_method(cfg: dict):
    return method_class(cfg)(cfg)


from s4mc.methods import mean_teacher, unimatch  # noqa: E402,F401  (register the built-in methods)
