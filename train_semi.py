#!/usr/bin/env python
"""Train S4MC from one YAML config: `python train_semi.py --config experiments/toy/config.yaml`.

Single process, `torchrun --nproc_per_node=N train_semi.py ...`, or the legacy
`python -m torch.distributed.launch`. See `--help` and the README.
"""

import sys

from s4mc.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
