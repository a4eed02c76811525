"""Training methods (`trainer.method`): one file each, registered by name.

A method turns one batch into a loss; `s4mc.engine.step.train_step` calls
`method.loss(state, labeled, unlabeled)`, steps the optimizer, and updates the EMA teacher
when the method asks for it. The contract and the shared pieces are in `base.py`. Every
module of this package is imported here, so a new method is one new file (and its config
block) and nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil

from s4mc.methods.base import (METHODS, StepLoss, build_method, describe_method, method_class,  # noqa: F401
                               register_method)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
