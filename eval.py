#!/usr/bin/env python
"""Evaluate a checkpoint with the in-training evaluation: `python eval.py --config C --checkpoint P`.

See `--help` and the README for modes (whole, center_crop, sliding), multi-scale,
flip, test-time refinement and saved predictions.
"""

import sys

if __name__ == "__main__":
    try:
        from s4mc.cli import eval_main
    except KeyboardInterrupt:  # Ctrl-C while Python imports: one line, not a traceback
        print("interrupted by Ctrl-C while starting; nothing was written", file=sys.stderr)
        sys.exit(130)
    sys.exit(eval_main())
