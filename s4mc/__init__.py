"""s4mc: semi-supervised semantic segmentation with S4MC (Kimhi et al., 2023) on modern PyTorch."""

from pathlib import Path

__version__ = "0.1.0"

# The repository root (the folder holding train_semi.py): configs' relative paths and the shipped data
# (data/splits, data/toy_pretrain) are found from here. Defined here, the one module every other imports.
REPO_ROOT = Path(__file__).resolve().parent.parent
