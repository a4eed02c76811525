"""The types a config schema is written in: one `Key` per leaf, with its default, types and bounds.

The core schema (s4mc/config.py) and every plug-in's own block (a method's `trainer.<name>`,
a term's `trainer.terms.<name>`) are written with these, so a plug-in never imports the config
loader that validates it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REQUIRED = object()  # a Key default meaning "the config must give this key"
NUM = (int, float)
NONE = type(None)


@dataclass(frozen=True)
class Key:
    """One leaf of a schema: its default, the accepted types and values."""

    default: Any
    types: tuple = ()
    choices: tuple | None = None
    path: bool = False  # resolve relative to the path base
    low: float | None = None  # inclusive bounds of a number, checked with the type
    high: float | None = None


def key(default, *types, choices=None, path=False, low=None, high=None) -> Key:
    """A Key whose types default to the default's own type."""
    if not types:
        types = (type(default),)
    return Key(default, types, tuple(choices) if choices else None, path, low, high)
