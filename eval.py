#!/usr/bin/env python
"""Evaluate a checkpoint with the in-training evaluation: `python eval.py --config C --checkpoint P`.

See `--help` and the README for modes (whole, center_crop, sliding), multi-scale,
flip, test-time refinement and saved predictions.
"""

import sys

from s4mc.cli import eval_main

if __name__ == "__main__":
    sys.exit(eval_main())
