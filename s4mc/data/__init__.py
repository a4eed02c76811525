"""Datasets, transforms and loaders (see data/README.md for layouts and CLIs).

Public API:
    build_train_loaders(cfg, *, rank=0, world_size=1, seed=0, labeled_only=False) -> TrainLoaders
    build_val_dataset(cfg) -> SegmentationDataset
    dataset_info(cfg) -> DatasetInfo(num_classes, class_names, palette, ignore_index)
CLIs: python -m s4mc.data.splits {fetch,make,check}, python -m s4mc.data.priors,
      python -m s4mc.data.toy
"""

from .datasets import (RepeatDataset, Sample, SegmentationDataset, build_samples, cityscapes_lut,
                       read_split)
from .loaders import (DatasetInfo, TrainLoaders, build_loader, build_train_datasets,
                      build_train_loaders, build_val_dataset, dataset_info)
from .toy import ensure_toy, generate_toy
from .transforms import EvalTransform, StrongPhotometric, TrainTransform, center_crop

__all__ = [
    "DatasetInfo", "EvalTransform", "RepeatDataset", "Sample", "SegmentationDataset",
    "StrongPhotometric", "TrainLoaders", "TrainTransform", "build_loader", "build_samples",
    "build_train_datasets", "build_train_loaders", "build_val_dataset", "center_crop",
    "cityscapes_lut", "dataset_info", "ensure_toy", "generate_toy", "read_split",
]
