"""Training loaders and the validation dataset, built from the config dict.

Per-epoch data follows the release: the labeled list is repeated to the length of
the unlabeled list, both are sharded by a DistributedSampler (also with one process,
so the loop always has samplers to call `set_epoch` on), and training loaders drop
the last incomplete batch so every step sees full per-GPU batches (CutMix pairs
sample i with i+1; BN statistics on a batch of 1 are meaningless).

Seeding: every item's augmentation is drawn from a generator seeded by (run seed,
stream, epoch, index) — see `SeededDataset` — so crops differ across ranks (disjoint
indices), the labeled/unlabeled streams and epochs, and do not depend on which worker
loads an item. A run therefore repeats exactly from its seed, and a run resumed
mid-epoch sees the same batches as one that never stopped. Shuffling follows the
DistributedSampler's seed + epoch.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from s4mc.errors import ConfigError, DataError

from .classes import BUILTIN, voc_palette
from .datasets import (DATASET_TYPES, RepeatDataset, SegmentationDataset, build_samples, read_split,
                       default_unlabeled_list)
from .transforms import EvalTransform, StrongPhotometric, TrainTransform

log = logging.getLogger(__name__)

_STREAM_LABELED, _STREAM_UNLABELED = 0, 1
# A second pass over the unlabeled set in the unlabeled pass's order, augmented afresh (UniMatch's mix batch).
STREAM_MIX = 2


class TrainLoaders(NamedTuple):
    labeled: DataLoader
    unlabeled: DataLoader | None       # None with labeled_only=True
    samplers: tuple                    # call s.set_epoch(epoch) on each, every epoch


class DatasetInfo(NamedTuple):
    num_classes: int
    class_names: list[str]
    palette: list[list[int]]
    ignore_index: int


def _get(cfg: dict, dotted: str, default: Any = None) -> Any:
    """cfg lookup that tolerates a missing key (config.py fills defaults, but tests and
    tools may pass a partial dict)."""
    cur: Any = cfg
    for k in dotted.split("."):
        if not isinstance(cur, dict) or k not in cur or cur[k] is None:
            return default
        cur = cur[k]
    return cur


def _require(cfg: dict, dotted: str) -> Any:
    v = _get(cfg, dotted)
    if v is None:
        raise ConfigError(f"config key {dotted} is required")
    return v


def _dataset_type(cfg: dict) -> str:
    t = _require(cfg, "dataset.type")
    aliases = {"pascal_semi": "pascal", "cityscapes_semi": "cityscapes"}
    t = aliases.get(t, t)
    if t not in DATASET_TYPES:
        raise ConfigError(f"dataset.type {t!r} is not one of {DATASET_TYPES}")
    return t


def dataset_info(cfg: dict) -> DatasetInfo:
    """Number of classes, names, palette (RGB triples) and ignore index of cfg's dataset."""
    t = _dataset_type(cfg)
    n = int(_require(cfg, "net.num_classes"))
    ignore = int(cfg["dataset"]["ignore_index"])
    if not 0 <= ignore <= 255:
        raise ConfigError(f"dataset.ignore_index must be in [0, 255] (masks are 8-bit), got {ignore}")
    names = cfg["dataset"]["class_names"]
    palette = cfg["dataset"]["palette"]
    builtin_names, builtin_palette = BUILTIN.get(t, (None, None))
    if names is None:
        if builtin_names is not None and len(builtin_names) == n:
            names = list(builtin_names)
        elif t == "custom":
            names = [f"class_{i}" for i in range(n)]
        else:
            raise ConfigError(
                f"net.num_classes is {n} but the built-in {t} classes number {len(builtin_names)}; "
                "set dataset.class_names to match")
    names = [str(x) for x in names]
    if len(names) != n:
        raise ConfigError(f"dataset.class_names has {len(names)} entries, net.num_classes is {n}")
    if palette is None:
        palette = builtin_palette if (builtin_palette is not None and len(builtin_palette) == n) else voc_palette(n)
    palette = [[int(c) for c in rgb] for rgb in palette]
    if len(palette) < n or any(len(rgb) != 3 for rgb in palette):
        raise ConfigError(f"dataset.palette needs {n} [r, g, b] entries, got {len(palette)}")
    return DatasetInfo(n, names, palette[:n], ignore)


def _samples(cfg: dict, root: str, split: str, require_masks: bool, root_key: str):
    if not os.path.isdir(root):
        raise DataError(f"{root_key}: the dataset root {root} does not exist or is not a directory")
    return build_samples(
        _dataset_type(cfg), root, split, require_masks=require_masks,
        image_dir=cfg["dataset"]["image_dir"], mask_dir=cfg["dataset"]["mask_dir"],
        image_suffix=cfg["dataset"]["image_suffix"],
        mask_suffix=cfg["dataset"]["mask_suffix"])


def _maybe_make_toy(cfg: dict, root: str, root_key: str) -> None:
    """Generate the toy dataset on first use, but only in a folder named `toy` (the configs'
    data/toy): a mistyped data_root must be an error, not a fresh dataset in the wrong place."""
    if _dataset_type(cfg) != "toy":
        return
    from .toy import ensure_toy  # imported here: see s4mc/data/__init__.py (python -m s4mc.data.toy)

    path = Path(root)
    if path.name == "toy" or (path.is_dir() and any(path.iterdir())):
        ensure_toy(root)
        return
    raise DataError(
        f"{root_key}: {root} does not exist. The toy dataset is generated on first use only in a folder "
        f"named toy (as data/toy); generate it elsewhere with python -m s4mc.data.toy --root {root}"
    )


def _train_transform(cfg: dict, strong_views: int, padding_mask: bool = False) -> TrainTransform:
    crop = cfg["dataset"]["train"]["crop"]
    size = crop.get("size", [513, 513])
    if isinstance(size, int):
        size = [size, size]
    return TrainTransform(
        crop_size=size,
        scale_range=cfg["dataset"]["train"]["rand_resize"],
        flip=bool(cfg["dataset"]["train"]["flip"]),
        mean=cfg["dataset"]["mean"],
        std=cfg["dataset"]["std"],
        pad_label=int(crop["pad_label"]),
        strong=StrongPhotometric.from_cfg(cfg["dataset"]["train"]["strong_aug"]) if strong_views else None,
        strong_views=max(strong_views, 1),
        padding_mask=padding_mask,
    )


def check_n_sup(cfg: dict, labeled_list, count: int) -> None:
    """dataset.n_sup, when set, must be the labeled list's length (training and the header preview alike).

    The release drew a random n_sup-subset of (or repeated) the list; a mismatch here is
    almost always the wrong split file, so it is an error rather than a silent resample.
    """
    n_sup = cfg["dataset"]["n_sup"]
    if n_sup is not None and n_sup != count:
        raise ConfigError(f"dataset.n_sup = {n_sup} but {labeled_list} lists {count} labeled images; point "
                          "dataset.train.data_list at the split with that many images (python -m s4mc.data.splits "
                          "make), or drop the check with --opts dataset.n_sup=null")


def build_train_datasets(cfg: dict, *, labeled_only: bool = False, strong_views: int = 0,
                         padding_mask: bool = False):
    """(labeled dataset, unlabeled dataset or None), not repeated, with train transforms.

    strong_views: how many strong photometric views of each unlabeled image the training
    method asks for (its `strong_views(cfg)`: 0, 1 or 2). padding_mask: unlabeled items also
    carry "padding", true on the crop's padded border.
    """
    info = dataset_info(cfg)
    root = str(_require(cfg, "dataset.train.data_root"))
    root_key = "dataset.train.data_root"
    _maybe_make_toy(cfg, root, root_key)
    labeled_list = str(_require(cfg, "dataset.train.data_list"))
    weak = _train_transform(cfg, strong_views=0)
    labeled_samples = _samples(cfg, root, labeled_list, True, root_key)
    check_n_sup(cfg, labeled_list, len(labeled_samples))
    labeled = SegmentationDataset(labeled_samples, num_classes=info.num_classes,
                                  ignore_index=info.ignore_index, transform=weak)
    if labeled_only:
        return labeled, None
    unl_list = cfg["dataset"]["train"]["unlabeled_list"] or str(default_unlabeled_list(labeled_list))
    strong = strong_views
    unlabeled = SegmentationDataset(_samples(cfg, root, unl_list, False, root_key), num_classes=info.num_classes,
                                    ignore_index=info.ignore_index,
                                    transform=(_train_transform(cfg, strong_views=strong, padding_mask=padding_mask)
                                               if strong or padding_mask else weak))
    return labeled, unlabeled


def _stream_seed(seed: int, rank: int, stream: int) -> int:
    # SeedSequence mixes the triple so that nearby (seed, rank) pairs do not share streams
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(rank), int(stream)]).generate_state(1)[0])


def worker_init_fn(worker_id: int) -> None:
    """Runs in each worker. torch/random/numpy are already seeded by the DataLoader
    from the (rank-dependent) base seed + worker id; keep cv2 single-threaded, and leave
    Ctrl-C to the main process, which stops the run at an iteration boundary (a worker
    killed by it would end the run with no checkpoint)."""
    cv2.setNumThreads(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class EpochTaggedSampler(DistributedSampler):
    """A DistributedSampler that yields (epoch, index) pairs instead of bare indices."""

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, i) for i in super().__iter__())


class SeededDataset(torch.utils.data.Dataset):
    """Draws each item's augmentation from its own generator, seeded by (run seed, stream,
    epoch, index) alone.

    So a sample is augmented the same way whichever worker loads it and whatever ran
    before it in that process: a run resumed mid-epoch replays the exact batches of an
    uninterrupted one, and the dataset's randomness never touches the training RNG
    (dropout, mixing) when workers=0. The global torch RNG is restored afterwards.
    """

    def __init__(self, dataset, seed: int, stream: int):
        self.dataset = dataset
        self.seed = int(seed)
        self.stream = int(stream)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        item_seed = np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.stream, int(epoch), int(index)])
        with torch.random.fork_rng(devices=[]):
            # only the CPU generator (which fork_rng restores): torch.manual_seed would
            # also reseed every initialised CUDA generator when workers=0 on a GPU
            torch.default_generator.manual_seed(
                int(item_seed.generate_state(1, dtype=np.uint64)[0]) & 0x7FFFFFFFFFFFFFFF)
            return self.dataset[index]


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS tells it): the count above which
    torch warns about DataLoader workers."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return max(os.cpu_count() or 1, 1)


_capped_told: set[tuple[int, int]] = set()


def cap_workers(workers: int) -> int:
    """dataset.workers, at most the usable CPUs: more workers than CPUs only compete for them
    (torch warns), and items are seeded by index, not by worker, so the count changes no number."""
    cpus = usable_cpus()
    if workers <= cpus:
        return workers
    if (workers, cpus) not in _capped_told:
        _capped_told.add((workers, cpus))
        log.info("dataset.workers %d capped at %d, the CPUs this process may use", workers, cpus)
    return cpus


def build_loader(dataset, *, batch_size: int, workers: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, stream: int = 0, shuffle: bool = True, drop_last: bool = True):
    """(DataLoader, DistributedSampler) with the seeding scheme described in the module doc."""
    if len(dataset) < batch_size * world_size and drop_last:
        raise DataError(
            f"dataset of {len(dataset)} items is smaller than one global batch "
            f"({batch_size} x {world_size} GPUs); no full batch can be drawn")
    sampler = EpochTaggedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                 seed=int(seed), drop_last=False)
    dataset = SeededDataset(dataset, seed, stream)
    workers = cap_workers(workers)
    gen = torch.Generator()
    gen.manual_seed(_stream_seed(seed, rank, stream))
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        pin_memory=torch.cuda.is_available(), drop_last=drop_last,
        worker_init_fn=worker_init_fn, generator=gen, persistent_workers=workers > 0,
    )
    return loader, sampler


def build_train_loaders(cfg: dict, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                        labeled_only: bool = False, strong_views: int = 0, padding_mask: bool = False,
                        unlabeled_stream: int = _STREAM_UNLABELED) -> TrainLoaders:
    """Labeled and unlabeled training loaders (per-GPU batch dataset.batch_size each).

    labeled_only=True (supervised baseline): the labeled set is not repeated and
    `unlabeled` is None. strong_views, padding_mask: as `build_train_datasets`.
    unlabeled_stream: the augmentation stream of the unlabeled pass; `STREAM_MIX` with the
    same seed gives the same images in the same order, augmented independently.
    """
    labeled, unlabeled = build_train_datasets(cfg, labeled_only=labeled_only, strong_views=strong_views,
                                              padding_mask=padding_mask)
    bs = int(cfg["dataset"]["batch_size"])
    workers = int(cfg["dataset"]["workers"])
    if unlabeled is None and cfg["trainer"]["sup_epoch_length"] == "unlabeled":
        # Supervised-only at the semi-supervised budget: the labeled stream a semi run would see.
        labeled_list = str(_require(cfg, "dataset.train.data_list"))
        unl_list = cfg["dataset"]["train"]["unlabeled_list"] or str(default_unlabeled_list(labeled_list))
        labeled = RepeatDataset(labeled, max(len(read_split(unl_list)), len(labeled)))
    elif unlabeled is not None:
        # repeat to the unlabeled length (never shorten: a labeled list longer than
        # the unlabeled one, e.g. Cityscapes 1488/1487, keeps every labeled image)
        labeled = RepeatDataset(labeled, max(len(unlabeled), len(labeled)))
    elif len(labeled) < bs * world_size:
        # supervised-only on a tiny split (e.g. 20 toy labels on 4 GPUs x 8): repeat just
        # enough for one full global batch instead of yielding no batch at all
        log.warning("labeled set (%d images) is smaller than one global batch (%d); repeating it",
                    len(labeled), bs * world_size)
        labeled = RepeatDataset(labeled, bs * world_size)
    lab_loader, lab_sampler = build_loader(labeled, batch_size=bs, workers=workers, rank=rank,
                                           world_size=world_size, seed=seed, stream=_STREAM_LABELED)
    if unlabeled is None:
        return TrainLoaders(lab_loader, None, (lab_sampler,))
    unl_loader, unl_sampler = build_loader(unlabeled, batch_size=bs, workers=workers, rank=rank,
                                           world_size=world_size, seed=seed, stream=unlabeled_stream)
    return TrainLoaders(lab_loader, unl_loader, (lab_sampler, unl_sampler))


def build_val_dataset(cfg: dict) -> SegmentationDataset:
    """Validation set: full-size normalised images, items {"image", "label", "id"}."""
    info = dataset_info(cfg)
    root = str(_require(cfg, "dataset.val.data_root"))
    _maybe_make_toy(cfg, root, "dataset.val.data_root")
    samples = _samples(cfg, root, str(_require(cfg, "dataset.val.data_list")), True, "dataset.val.data_root")
    return SegmentationDataset(
        samples, num_classes=info.num_classes, ignore_index=info.ignore_index,
        transform=EvalTransform(cfg["dataset"]["mean"],
                                cfg["dataset"]["std"]))


# --------------------------------------------------------------------------- validation


class UnpaddedDistributedSampler(Sampler[int]):
    """Rank r of W takes indices r, r + W, r + 2W, ... of a dataset of length N.

    Unlike torch's DistributedSampler it never pads the shards to equal length with
    repeated indices, so a summed confusion matrix counts every image exactly once.
    Shards then differ in length by at most one, which is harmless for evaluation
    because the only collective (the final all_reduce) happens after the loop.
    """

    def __init__(self, dataset_or_len, num_replicas: int = 1, rank: int = 0):
        n = dataset_or_len if isinstance(dataset_or_len, int) else len(dataset_or_len)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"UnpaddedDistributedSampler: need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        self.total = int(n)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)

    def __iter__(self):
        return iter(range(self.rank, self.total, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.total, self.num_replicas))

    def set_epoch(self, epoch: int) -> None:  # same interface as DistributedSampler; order is fixed
        pass


def _collate(items: list[dict]) -> dict:
    """Stack dataset items into a batch dict; different image sizes get a clear error."""
    shapes = {tuple(it["image"].shape) for it in items}
    if len(shapes) > 1:
        raise DataError(
            f"validation images {[it.get('id') for it in items]} have different sizes {sorted(shapes)}; "
            "full-image evaluation needs batch_size=1"
        )
    batch = {
        "image": torch.stack([torch.as_tensor(it["image"]) for it in items]),
        "label": torch.stack([torch.as_tensor(it["label"]).long() for it in items]),
        "id": [str(it.get("id", "")) for it in items],
    }
    return batch


def build_val_loader(dataset, *, rank: int = 0, world_size: int = 1, workers: int = 2, batch_size: int = 1) -> DataLoader:
    """A DataLoader over this rank's share of a validation dataset, in a fixed order.

    Items are dicts ``{"image": float[3,H,W], "label": long[H,W], "id": str}``; batches
    are the same keys stacked (ids as a list). batch_size=1 because full images differ
    in size.
    """

    workers = cap_workers(workers)
    sampler = UnpaddedDistributedSampler(dataset, world_size, rank) if world_size > 1 else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        sampler=sampler,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
        persistent_workers=False,
        worker_init_fn=worker_init_fn,
        # Its own generator: a loader draws a seed per pass, and from the global RNG that
        # would shift dropout and mixing, so evaluating would change the training run.
        generator=torch.Generator().manual_seed(0),
    )
