"""The optimizer and its schedule (docs/method.md step 10): SGD with a backbone and a head group,
the poly LR, linear LR scaling and gradient accumulation."""

from __future__ import annotations

import torch

from s4mc.errors import ConfigError


def build_optimizer(model: torch.nn.Module, cfg: dict, world_size: int, grad_scaler: bool = False) -> torch.optim.Optimizer:
    """One SGD (or AdamW, `trainer.optimizer.type: adamw`) with two groups: the backbone at lr,
    decoder/aux at head_lr_mult × lr (docs/method.md step 10)."""
    tr = cfg["trainer"]
    kwargs = dict(tr["optimizer"]["kwargs"])
    betas = tuple(kwargs.pop("betas"))
    base_lr = kwargs.pop("lr") * lr_scale(cfg, world_size)
    head_mult = tr["head_lr_mult"]
    if head_mult is None:
        head_mult = 10.0 if cfg["dataset"]["type"] == "pascal" else 1.0
    backbone = [p for p in model.encoder.parameters() if p.requires_grad]
    head = [p for n, p in model.named_parameters() if not n.startswith("encoder.") and p.requires_grad]
    groups = [
        {"params": backbone, "lr": base_lr, "initial_lr": base_lr, "name": "backbone"},
        {"params": head, "lr": base_lr * head_mult, "initial_lr": base_lr * head_mult, "name": "head"},
    ]
    fused = tr["optimizer"]["fused"]
    on_cuda = backbone[0].is_cuda
    if fused == "auto":
        # Not with fp16's GradScaler: a skipped (inf) first step must not seed the momentum buffers.
        fused = on_cuda and not grad_scaler
    extra = {"fused": True} if fused and on_cuda else {}
    if tr["optimizer"]["type"] == "adamw":
        # UniMatch V2's AdamW (docs/method.md, "UniMatch V2"); eps is torch's default, as there.
        return torch.optim.AdamW(groups, lr=base_lr, betas=betas, weight_decay=kwargs["weight_decay"], **extra)
    return torch.optim.SGD(groups, lr=base_lr, **kwargs, **extra)


def lr_scale(cfg: dict, world_size: int) -> float:
    """`lr_scaling: linear` multiplies the LR by global batch / reference batch."""
    if cfg["trainer"]["lr_scaling"] != "linear":
        return 1.0
    return cfg["dataset"]["batch_size"] * world_size * resolve_accumulate(cfg, world_size) / cfg["trainer"]["reference_batch"]


def resolve_accumulate(cfg: dict, world_size: int) -> int:
    """`trainer.accumulate` as a number: "auto" reaches the recipe's global batch with this world size."""
    acc = cfg["trainer"]["accumulate"]
    if acc != "auto":
        return int(acc)
    recipe = (cfg.get("recipe") or {}).get("global_batch") or {}
    wanted, per = recipe.get("labeled"), cfg["dataset"]["batch_size"] * world_size
    if not wanted:
        raise ConfigError("trainer.accumulate: auto needs recipe.global_batch.labeled in the config (the recipe's "
                          "global batch); set it, or give trainer.accumulate a number")
    if wanted % per:
        raise ConfigError(f"trainer.accumulate: auto cannot reach the recipe's global batch {wanted} from "
                          f"{world_size} process(es) × dataset.batch_size {cfg['dataset']['batch_size']} = {per}: "
                          f"{wanted} is not a multiple of {per}; change dataset.batch_size or give a number")
    return wanted // per


def poly_lr(base_lr: float, iteration: int, max_iters: int, power: float = 0.9) -> float:
    """U2PL's poly schedule, evaluated per iteration: base · (1 − it/max)^power."""
    return base_lr * (1.0 - iteration / max_iters) ** power


def set_lr(optimizer, iteration: int, max_iters: int, power: float) -> float:
    """Set every param group to its own base LR on the poly curve; return the backbone's."""
    for group in optimizer.param_groups:
        group["lr"] = poly_lr(group["initial_lr"], iteration, max_iters, power)
    return optimizer.param_groups[0]["lr"]
