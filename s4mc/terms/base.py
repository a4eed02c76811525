"""Additive loss terms: the registry of name → builder, and the small contract a term keeps.

A term is switched on by its config block, `trainer.terms.<name>` (the U2PL contrastive term
also answers to its older key, `trainer.contrastive`). The training method calls every active
term once per semi-supervised step with a `TermInputs`; the term returns its weighted loss and
the metrics it logs. Checkpoints keep each term's `state_dict()` under its name, so the loop,
checkpoints and logs never need to know which terms exist.

Adding one (see README, "Add a method or a term")::

    from s4mc.schema import Key
    from s4mc.terms import register_term

    @register_term("entropy_min", schema={"loss_weight": Key(0.1, (float, int))})
    class EntropyMin:
        def __init__(self, settings, cfg, device): ...
        def __call__(self, state, inputs): return loss, {"loss_entropy_min": loss.detach()}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from s4mc.errors import ConfigError


@dataclass(frozen=True)
class TermSpec:
    name: str
    builder: Callable  # (validated block, full cfg, device) -> term object
    schema: dict  # s4mc.config Keys: the block's defaults and types, its single source of truth
    legacy_key: str | None = None  # a `trainer.<key>` block that also switches the term on
    needs_rep: bool = False  # the model must compute its `rep` output
    # Checks that span keys of the block: check(block, fail), fail(key, message) raising ConfigError.
    # Single-key types, defaults and bounds belong in `schema`.
    check: Callable | None = None


TERMS: dict[str, TermSpec] = {}


def register_term(name: str, *, schema: dict, legacy_key: str | None = None, needs_rep: bool = False,
                  check: Callable | None = None):
    # The builder may carry `describe(block) -> str`, the run header's words for the term.
    """Class or function decorator adding a term builder to TERMS under `name`."""
    def add(builder):
        if name in TERMS and TERMS[name].builder is not builder:
            raise ValueError(f"a loss term named {name!r} is already registered")
        TERMS[name] = TermSpec(name, builder, schema, legacy_key, needs_rep, check)
        return builder
    return add


@dataclass
class TermInputs:
    """What a term sees of one semi-supervised step: outputs on cat(labeled, unlabeled) batches."""

    student: dict  # the student's outputs ("pred", and "rep" when a term needs it)
    teacher: dict  # the teacher's outputs on the same images, without gradients
    labeled_label: torch.Tensor  # [B_l, H, W]
    pseudo_label: torch.Tensor  # [B_u, H, W] hard pseudo-labels of the unlabeled images, before masking
    epochs: int


def active_terms(cfg: dict) -> dict[str, dict]:
    """name → validated block of every term this config switches on, in registration order."""
    trainer = cfg["trainer"]
    active = {}
    for name, spec in TERMS.items():
        block = trainer["terms"].get(name)
        legacy = trainer.get(spec.legacy_key) if spec.legacy_key else None
        if block is not None and legacy is not None:
            raise ConfigError(f"the {name} term is configured twice: trainer.terms.{name} and "
                              f"trainer.{spec.legacy_key}; keep one")
        if block is None:
            block = legacy
        if block is not None:
            active[name] = block
    return active


def build_terms(cfg: dict, device: torch.device) -> dict:
    """name → term object for the config's active terms."""
    return {name: TERMS[name].builder(block, cfg, device) for name, block in active_terms(cfg).items()}


def needs_rep(cfg: dict) -> bool:
    return any(TERMS[name].needs_rep for name in active_terms(cfg))


def apply_terms(state, inputs: TermInputs) -> tuple[torch.Tensor | None, dict]:
    """Sum of the active terms' losses (None with no term) and their metrics."""
    total, metrics = None, {}
    for term in state.terms.values():
        loss, logged = term(state, inputs)
        total = loss if total is None else total + loss
        metrics.update(logged)
    return total, metrics


def describe_terms(cfg: dict) -> str:
    """The header's words for the active terms: each term's own `describe(block)`, else its name."""
    parts = []
    for name, block in active_terms(cfg).items():
        describe = getattr(TERMS[name].builder, "describe", None)
        parts.append(describe(block) if describe is not None else name)
    return "terms: " + "; ".join(parts) if parts else "no additive terms"
