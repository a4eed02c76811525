"""Datasets, transforms and loaders (see data/README.md for layouts and CLIs).

Public API:
    build_train_loaders(cfg, *, rank=0, world_size=1, seed=0, labeled_only=False, strong_views=0,
                        padding_mask=False, unlabeled_stream=1) -> TrainLoaders
    build_val_dataset(cfg) -> SegmentationDataset
    build_val_loader(dataset, *, rank=0, world_size=1, workers=2, batch_size=1) -> DataLoader
    dataset_info(cfg) -> DatasetInfo(num_classes, class_names, palette, ignore_index)
CLIs: python -m s4mc.data.splits {fetch,make,check}, python -m s4mc.data.priors, python -m s4mc.data.coco,
      python -m s4mc.data.toy
"""

from .datasets import (RepeatDataset, Sample, SegmentationDataset, build_samples, cityscapes_lut,
                       read_split)
from .loaders import (STREAM_MIX, DatasetInfo, TrainLoaders, build_loader, build_train_datasets,
                      build_train_loaders, build_val_dataset, build_val_loader, dataset_info)
from .transforms import EvalTransform, StrongPhotometric, TrainTransform, center_crop

__all__ = [
    "STREAM_MIX", "DatasetInfo", "EvalTransform", "RepeatDataset", "Sample", "SegmentationDataset",
    "StrongPhotometric", "TrainLoaders", "TrainTransform", "build_loader", "build_samples",
    "build_train_datasets", "build_train_loaders", "build_val_dataset", "build_val_loader", "center_crop",
    "cityscapes_lut", "dataset_info", "ensure_toy", "generate_toy", "read_split",
]


def __getattr__(name: str):
    # The toy generator loads on first use: imported eagerly, `python -m s4mc.data.toy`
    # would find its own module already loaded and warn.
    if name in ("ensure_toy", "generate_toy"):
        from . import toy

        return getattr(toy, name)
    raise AttributeError(f"module 's4mc.data' has no attribute {name!r}")
