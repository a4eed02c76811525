"""Additive loss terms (`trainer.terms.<name>`): one file each, registered by name.

The contract and the registry are in `base.py`. Every module of this package is imported
here, so a new term is one new file (and its config block) and nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil

from s4mc.terms.base import (TERMS, TermInputs, TermSpec, active_terms, apply_terms, build_terms,  # noqa: F401
                             describe_terms, needs_rep, register_term)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
