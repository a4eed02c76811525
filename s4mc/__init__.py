"""s4mc: semi-supervised semantic segmentation with S4MC (Kimhi et al., 2023) on modern PyTorch."""

__version__ = "0.1.0"
