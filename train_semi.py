#!/usr/bin/env python
"""Train S4MC from one YAML config: `python train_semi.py --config experiments/toy/config.yaml`.

Single process, `torchrun --nproc_per_node=N train_semi.py ...`, or the legacy
`python -m torch.distributed.launch`. See `--help` and the README.
"""

import sys

if __name__ == "__main__":
    try:
        from s4mc.cli import train_main
    except KeyboardInterrupt:  # Ctrl-C while Python imports: one line, not a traceback
        print("interrupted by Ctrl-C while starting; nothing was written", file=sys.stderr)
        sys.exit(130)
    sys.exit(train_main())
