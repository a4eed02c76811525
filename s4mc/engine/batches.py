"""Where training batches are made: one (labeled, unlabeled) pair per iteration.

When the method needs a partner for every unlabeled image (a per-GPU batch of 1 has nobody
to mix with), a second, differently shuffled pass over the unlabeled set supplies it, and its
tensors join the unlabeled batch as `partner_<key>`: the step reads one dict, and never has
to thread a third batch through.
"""

from __future__ import annotations

from s4mc.data import STREAM_MIX, build_train_loaders
from s4mc.methods import method_class

PARTNER_SEED_OFFSET = 7919  # the partner pass's shuffling differs from the unlabeled pass's


def loader_options(cfg: dict) -> dict:
    """What the method asks of the training loaders: its strong views, and whether unlabeled
    items carry their padding mask (s4mc/methods/base.py)."""
    method = method_class(cfg)
    padding = getattr(method, "padding_mask", None)
    return {"strong_views": method.strong_views(cfg), "padding_mask": bool(padding and padding(cfg))}


def build_partner_loader(cfg: dict, rank: int, world_size: int):
    """The partner pass, or None when the method mixes within the batch.

    Differently shuffled by default; a method whose `partner_same_images(cfg)` is true gets the
    unlabeled pass's own order, each image augmented afresh (UniMatch's mix loader)."""
    method = method_class(cfg)
    if cfg["trainer"]["mode"] == "sup" or not method.needs_partner(cfg):
        return None
    same = getattr(method, "partner_same_images", None)
    if same is not None and same(cfg):
        return build_train_loaders(cfg, rank=rank, world_size=world_size, seed=cfg["seed"],
                                   unlabeled_stream=STREAM_MIX, **loader_options(cfg)).unlabeled
    return build_train_loaders(cfg, rank=rank, world_size=world_size, seed=cfg["seed"] + PARTNER_SEED_OFFSET,
                               **loader_options(cfg)).unlabeled


def with_partner(unlabeled: dict, partner: dict) -> dict:
    """`unlabeled` plus `partner`'s tensors under `partner_<key>`."""
    return {**unlabeled, **{f"partner_{key}": value for key, value in partner.items()}}


def epoch_batches(labeled_loader, unlabeled_loader=None, partner_loader=None):
    """Iterate one epoch's (labeled, unlabeled) pairs; unlabeled is None for supervised training."""
    if unlabeled_loader is None:
        return ((batch, None) for batch in labeled_loader)
    if partner_loader is None:
        return zip(labeled_loader, unlabeled_loader)
    return ((labeled, with_partner(unlabeled, partner))
            for labeled, unlabeled, partner in zip(labeled_loader, unlabeled_loader, partner_loader))
