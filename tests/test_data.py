"""Tests for s4mc.data: layouts, bad-input errors, transforms, loaders, splits, priors, toy."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from s4mc.data import (build_loader, build_train_loaders, build_val_dataset, cityscapes_lut, dataset_info,
                       generate_toy, read_split)
from s4mc.data.classes import CITYSCAPES_ID_TO_TRAINID, PASCAL_PALETTE
from s4mc.data.datasets import build_samples
from s4mc.data.priors import neighbor_prior
from s4mc.data.splits import check_split, fetch_splits, make_split, split_sums, verify_split_bytes
from s4mc.data.transforms import EvalTransform, StrongPhotometric, TrainTransform, center_crop
from s4mc.config import load_config
from s4mc.errors import ConfigError, DataError

# The published lists ship in the repository (data/splits/README.md).
SPLITS = Path(__file__).resolve().parents[1] / "data" / "splits"


# ---------------------------------------------------------------------------
# tiny on-disk datasets
# ---------------------------------------------------------------------------

def _write_img(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(arr, cv2.COLOR_RGB2BGR))


def _write_mask(path: Path, arr: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8), mode="L")
    if palette:
        im = im.convert("P")
        im.putpalette([c for rgb in PASCAL_PALETTE for c in rgb] + [0] * (768 - 63))
        im = Image.fromarray(arr.astype(np.uint8), mode="P")
        im.putpalette([c for rgb in PASCAL_PALETTE for c in rgb] + [0] * (768 - 63))
    im.save(path)


def _rand_pair(rng, h=40, w=50, C=21):
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    lab = rng.integers(0, C, (h, w)).astype(np.uint8)
    lab[0, :3] = 255
    return img, lab


@pytest.fixture
def voc(tmp_path):
    """VOC layout: 6 train ids (2 labeled), 2 val; masks in SegmentationClassAug,
    except val_1 whose mask only exists in SegmentationClass (palette PNG)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "VOC"
    ids = [f"2007_{i:06d}" for i in range(6)]
    for i in ids + ["val_0"]:
        img, lab = _rand_pair(rng)
        _write_img(root / "JPEGImages" / f"{i}.jpg", img)
        _write_mask(root / "SegmentationClassAug" / f"{i}.png", lab)
    img, lab = _rand_pair(rng)
    _write_img(root / "JPEGImages" / "val_1.jpg", img)
    _write_mask(root / "SegmentationClass" / "val_1.png", lab, palette=True)
    sp = root / "splits"
    sp.mkdir()
    (sp / "labeled.txt").write_text("\n".join(ids[:2]))           # no final newline
    (sp / "unlabeled.txt").write_text("\n".join(ids[2:]) + "\n")
    (sp / "val.txt").write_text("val_0\r\nval_1\r\n")              # CRLF
    return root


def _cfg(dtype, root, *, labeled="splits/labeled.txt", val="splits/val.txt", num_classes=21, crop=32,
         batch=2, workers=0, strong=False, **extra_dataset):
    root = Path(root)
    ds = {"type": dtype, "batch_size": batch, "workers": workers, "ignore_index": 255,
          "train": {"data_root": str(root), "data_list": str(root / labeled), "flip": True,
                    "rand_resize": [0.5, 2.0], "crop": {"type": "rand", "size": [crop, crop], "pad_label": 255},
                    "strong_aug": {"color_jitter": [0.5, 0.5, 0.5, 0.25], "jitter_prob": 0.8,
                                   "grayscale_prob": 0.2, "blur_prob": 0.5, "blur_sigma": [0.1, 2.0]}},
          "val": {"data_root": str(root), "data_list": str(root / val)}}
    ds.update(extra_dataset)
    # Through the schema, as every real config: the loaders read validated values, never defaults of their own.
    return load_config(None, data={"seed": 0, "dataset": ds, "net": {"num_classes": num_classes},
                                   "trainer": {"epochs": 1, "unsupervised": {"strong_aug": strong}}})


# ---------------------------------------------------------------------------
# bad input -> DataError naming the file
# ---------------------------------------------------------------------------

def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="nope"):
        build_samples("pascal", tmp_path / "nope", tmp_path / "x.txt", require_masks=True)


def test_missing_and_empty_split(voc):
    with pytest.raises(DataError, match="missing.txt"):
        build_train_loaders(_cfg("pascal", voc, labeled="splits/missing.txt"))
    (voc / "splits" / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="empty.txt"):
        read_split(voc / "splits" / "empty.txt")


def test_missing_image(voc):
    (voc / "JPEGImages" / "2007_000001.jpg").unlink()
    with pytest.raises(DataError, match="2007_000001.jpg"):
        build_train_loaders(_cfg("pascal", voc))


def test_missing_mask_for_labeled(voc):
    (voc / "SegmentationClassAug" / "2007_000000.png").unlink()
    with pytest.raises(DataError, match="2007_000000"):
        build_train_loaders(_cfg("pascal", voc))


def test_corrupt_image_and_mask(voc):
    (voc / "JPEGImages" / "val_0.jpg").write_bytes(b"not a jpeg at all")
    ds = build_val_dataset(_cfg("pascal", voc))
    with pytest.raises(DataError, match="val_0.jpg"):
        ds[0]
    (voc / "SegmentationClassAug" / "2007_000000.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    lab, _ = build_train_loaders(_cfg("pascal", voc), labeled_only=True)[:2]
    with pytest.raises(DataError, match="2007_000000.png"):
        lab.dataset[0]


def test_mask_size_mismatch(voc):
    _write_mask(voc / "SegmentationClassAug" / "val_0.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError, match=r"val_0\.png.*10x10|10x10.*val_0\.png"):
        build_val_dataset(_cfg("pascal", voc))[0]


def test_label_out_of_range(voc):
    lab = np.zeros((40, 50), np.uint8)
    lab[5, 5] = 21
    lab[6, 6] = 255  # ignore is fine
    _write_mask(voc / "SegmentationClassAug" / "val_0.png", lab)
    with pytest.raises(DataError, match=r"\[21\].*val_0\.png"):
        build_val_dataset(_cfg("pascal", voc))[0]
    lab[5, 5] = 20
    _write_mask(voc / "SegmentationClassAug" / "val_0.png", lab)
    build_val_dataset(_cfg("pascal", voc))[0]


def test_rgb_mask_rejected(voc):
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(voc / "SegmentationClassAug" / "val_0.png")
    with pytest.raises(DataError, match="colour"):
        build_val_dataset(_cfg("pascal", voc))[0]


def test_class_names_mismatch(voc):
    with pytest.raises(ConfigError):
        dataset_info(_cfg("pascal", voc, num_classes=5))
    info = dataset_info(_cfg("pascal", voc))
    assert info.num_classes == 21 and info.class_names[15] == "person" and info.palette[15] == [192, 128, 128]
    assert len(dataset_info(_cfg("cityscapes", voc, num_classes=19)).class_names) == 19


# ---------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------

def test_voc_fallback_to_segmentation_class_palette(voc):
    ds = build_val_dataset(_cfg("pascal", voc))
    assert ds.ids == ["val_0", "val_1"]
    item = ds[1]
    expected = np.array(Image.open(voc / "SegmentationClass" / "val_1.png"))
    assert item["image"].shape == (3, 40, 50) and item["image"].dtype == torch.float32
    assert torch.equal(item["label"], torch.from_numpy(expected.astype(np.int64)))
    assert int(item["label"].max()) == 255 and int(item["label"][1:].max()) <= 20


def test_cityscapes_labelids_mapped(tmp_path):
    root = tmp_path / "cs"
    rel = "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    _write_img(root / rel, np.zeros((4, 8, 3), np.uint8))
    ids = np.array([[0, 1, 6, 7, 8, 9, 11, 12], [13, 17, 19, 20, 21, 22, 23, 24],
                    [25, 26, 27, 28, 29, 30, 31, 32], [33, 14, 15, 16, 18, 10, 34, 200]], np.uint8)
    _write_mask(root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png", ids)
    (root / "list.txt").write_text(rel)
    cfg = _cfg("cityscapes", root, val="list.txt", num_classes=19)
    item = build_val_dataset(cfg)[0]
    assert item["id"] == "aachen_000000_000019"
    lab = item["label"].numpy()
    expect = np.array([[255, 255, 255, 0, 1, 255, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11],
                       [12, 13, 14, 15, 255, 255, 16, 17], [18, 255, 255, 255, 255, 255, 255, 255]])
    np.testing.assert_array_equal(lab, expect)
    assert len(CITYSCAPES_ID_TO_TRAINID) == 19 and (cityscapes_lut() != 255).sum() == 19
    # labelTrainIds take precedence when present
    _write_mask(root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png",
                np.full((4, 8), 3, np.uint8))
    assert (build_val_dataset(cfg)[0]["label"] == 3).all()


def test_custom_dataset_unlabeled_without_masks(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "custom"
    for i in range(6):
        img, lab = _rand_pair(rng, 30, 30, C=3)
        _write_img(root / "images" / f"im{i}.png", img)
        if i < 3:
            _write_mask(root / "masks" / f"im{i}.png", lab)
    (root / "labeled.txt").write_text("im0\nim1\n")
    (root / "unlabeled.txt").write_text("im2.png\nim3\nim4\nim5\n")
    (root / "val.txt").write_text("im2\n")
    cfg = _cfg("custom", root, labeled="labeled.txt", val="val.txt", num_classes=3, crop=16,
               image_dir="images", mask_dir="masks", image_suffix=".png", mask_suffix=".png",
               class_names=["a", "b", "c"])
    info = dataset_info(cfg)
    assert info.class_names == ["a", "b", "c"] and len(info.palette) == 3
    loaders = build_train_loaders(cfg)
    unl = loaders.unlabeled.dataset.dataset  # inside the per-item seeding wrapper
    assert unl.ids == ["im2", "im3", "im4", "im5"]
    assert (unl[1]["label"] == 255).all()          # no mask -> all ignore
    assert (unl[0]["label"] != 255).any()          # mask present -> ground truth
    cfg["dataset"]["class_names"] = None
    assert dataset_info(cfg).class_names == ["class_0", "class_1", "class_2"]


# ---------------------------------------------------------------------------
# real split files
# ---------------------------------------------------------------------------

def test_split_checksums_counts_and_formats(tmp_path):
    """The shipped U2PL/S4MC lists: SHA-256 sums, counts, id formats, and fetch() against them."""
    _check_split_sums()
    for name, n_lab, n_unl in [("pascal/92", 92, 10490), ("pascal/662", 662, 9920), ("pascal/1464", 1464, 9118),
                               ("cityscapes/186", 186, 2789), ("cityscapes/1488", 1488, 1487)]:
        _check_split_counts(name, n_lab, n_unl)
    _check_val_and_formats()
    _check_fetch_with_files_as_fake_remote(tmp_path)


def _check_split_counts(name, n_lab, n_unl):
    lab = read_split(SPLITS / name / "labeled.txt")
    unl = read_split(SPLITS / name / "unlabeled.txt")
    assert (len(lab), len(unl)) == (n_lab, n_unl)
    assert not set(lab) & set(unl)
    total = 10582 if name.startswith("pascal") else 2975
    assert len(set(lab) | set(unl)) == total


def _check_val_and_formats():
    pv = read_split(SPLITS / "pascal/val.txt")
    cv = read_split(SPLITS / "cityscapes/val.txt")
    assert len(pv) == 1449 and len(cv) == 500
    assert all(len(x) == 11 and x[4] == "_" for x in pv)
    assert all(x.startswith("leftImg8bit/val/") and x.endswith("_leftImg8bit.png") for x in cv)
    # some files lack the final newline; the last id must still be whole
    raw = (SPLITS / "pascal/92/labeled.txt").read_bytes()
    assert not raw.endswith(b"\n") and read_split(SPLITS / "pascal/92/labeled.txt")[-1] == raw.decode().split("\n")[-1]


def _check_split_sums():
    sums = split_sums()
    files = sorted(p.relative_to(SPLITS).as_posix() for p in SPLITS.rglob("*.txt"))
    assert sorted(sums) == files
    for rel in files:
        data = (SPLITS / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sums[rel]["sha256"], rel
        verify_split_bytes(rel, data)


# ---------------------------------------------------------------------------
# splits CLI logic (offline)
# ---------------------------------------------------------------------------

def test_fetch_verifies_with_fake_fetcher(tmp_path):
    good = {"pascal/val.txt": b"a\nb\n", "pascal/92/labeled.txt": b"c\nd"}
    sums = {k: {"sha256": hashlib.sha256(v).hexdigest()} for k, v in good.items()}
    calls = []

    def fetcher(url):
        calls.append(url)
        return good[url.split("/splits/")[1]]

    out = fetch_splits(tmp_path / "s", fetcher=fetcher, sums=sums, base_url="https://x/splits/")
    assert sorted(p.relative_to(tmp_path / "s").as_posix() for p in out) == sorted(good)
    assert (tmp_path / "s/pascal/92/labeled.txt").read_bytes() == b"c\nd"
    fetch_splits(tmp_path / "s", fetcher=fetcher, sums=sums, base_url="https://x/splits/")
    assert len(calls) == 2  # valid files are not downloaded again

    def tampered(url):
        return b"c\nd\nEXTRA"
    with pytest.raises(DataError, match=r"pascal/92/labeled.txt.*https://y/splits/pascal/92/labeled.txt"):
        fetch_splits(tmp_path / "t", only=["pascal/92"], fetcher=tampered, sums=sums, base_url="https://y/splits/")
    assert not (tmp_path / "t/pascal/92/labeled.txt").exists()

    def offline(url):
        raise OSError("network unreachable")
    with pytest.raises(DataError, match=r"pascal/val.txt.*https://z/splits/pascal/val.txt.*unreachable"):
        fetch_splits(tmp_path / "u", only=["pascal/val.txt"], fetcher=offline, sums=sums, base_url="https://z/splits/")


def _check_fetch_with_files_as_fake_remote(tmp_path):
    out = fetch_splits(tmp_path, only=["cityscapes/186"],
                       fetcher=lambda url: (SPLITS / url.split("/data/splits/")[1]).read_bytes())
    assert len(out) == 2 and len(read_split(out[0])) in (186, 2789)


def test_make_and_check_split(tmp_path):
    root = tmp_path / "c"
    for i in range(10):
        _write_img(root / "img" / f"x{i}.jpg", np.zeros((8, 8, 3), np.uint8))
        if i < 8:
            _write_mask(root / "gt" / f"x{i}.png", np.zeros((8, 8), np.uint8))
    a = make_split(root, num_labeled=3, num_val=2, seed=5, image_dir="img", mask_dir="gt", out_dir=tmp_path / "o")
    b = make_split(root, num_labeled=3, num_val=2, seed=5, image_dir="img", mask_dir="gt")
    c = make_split(root, num_labeled=3, num_val=2, seed=6, image_dir="img", mask_dir="gt")
    assert a == b and a != c
    assert len(a["labeled"]) == 3 and len(a["val"]) == 2 and len(a["unlabeled"]) == 5
    assert {"x8", "x9"} <= set(a["unlabeled"]) and not {"x8", "x9"} & set(a["labeled"] + a["val"])
    assert read_split(tmp_path / "o" / "labeled.txt") == a["labeled"]
    with pytest.raises(DataError):
        make_split(root, num_labeled=8, num_val=2, image_dir="img", mask_dir="gt")
    (root / "img" / "x1.jpg").unlink()
    (root / "list.txt").write_text("x0\nx1\nx9\n")
    res = check_split("custom", root, root / "list.txt", image_dir="img", mask_dir="gt")
    assert res["missing_images"] == [str(root / "img" / "x1.jpg")] and res["missing_masks"] == ["x9"]


# ---------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------

def _coded_pair(h=60, w=80):
    """Image whose colour encodes the label exactly (blocks of 10x10 px)."""
    yy, xx = np.mgrid[0:h, 0:w]
    lab = ((yy // 10) * 8 + (xx // 10)) % 50
    img = np.stack([lab * 5, 255 - lab * 5, np.full_like(lab, 7)], -1).astype(np.uint8)
    return img, lab.astype(np.uint8)


def test_crop_flip_keep_alignment_exact():
    torch.manual_seed(0)
    img, lab = _coded_pair()
    t = TrainTransform(crop_size=(70, 90), scale_range=None, flip=True, mean=(0, 0, 0), std=(1, 1, 1))
    for _ in range(20):
        out = t(img, lab)
        x, y = out["image"], out["label"]
        assert x.shape == (3, 70, 90) and y.shape == (70, 90) and y.dtype == torch.int64
        valid = y != 255
        assert valid.sum() == 60 * 80        # crop larger than image: everything kept, rest padded
        assert torch.equal(x[0][valid], (y[valid] * 5).float())
        assert (x[:, ~valid] == 0).all()     # image padding is 0 after normalisation


def test_rescale_crop_alignment_and_nearest():
    torch.manual_seed(1)
    img, lab = _coded_pair(120, 160)
    t = TrainTransform(crop_size=(64, 64), scale_range=(0.5, 2.0), flip=True, mean=(0, 0, 0), std=(1, 1, 1))
    for _ in range(20):
        out = t(img, lab)
        y = out["label"]
        valid = y != 255
        assert set(torch.unique(y[valid]).tolist()) <= set(np.unique(lab).tolist())   # nearest: no new classes
        # the bilinear image may differ from the nearest label only right at a label
        # boundary (a pixel whose 3x3 neighbourhood holds another label)
        mismatch = (out["image"][0] - (y * 5).float()).abs() > 0.5
        yf = y.float()[None, None]
        at_edge = (torch.nn.functional.max_pool2d(yf, 3, 1, 1) != torch.nn.functional.max_pool2d(-yf, 3, 1, 1).neg())
        at_edge = at_edge[0, 0]
        at_edge[[0, -1], :] = True   # the neighbour across the crop border is unseen
        at_edge[:, [0, -1]] = True
        assert not (mismatch & valid & ~at_edge).any()
        assert (mismatch & valid).float().mean() < 0.3


def test_normalisation_and_pad_label():
    img = np.full((10, 10, 3), 100, np.uint8)
    lab = np.zeros((10, 10), np.uint8)
    t = TrainTransform(crop_size=(16, 16), scale_range=None, flip=False, pad_label=0)
    out = t(img, lab)
    mean, std = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])
    assert torch.allclose(out["image"][:, 0, 0], (100 - mean) / std)
    assert (out["label"] == 0).all()
    ev = EvalTransform()(img, lab)
    assert ev["image"].shape == (3, 10, 10)
    x, y = center_crop(ev["image"], ev["label"], (14, 6), pad_label=0)
    assert x.shape == (3, 14, 6) and (x[:, 0] == 0).all() and (y == 0).all()


def test_strong_view_same_geometry():
    torch.manual_seed(3)
    img, lab = _coded_pair()
    t = TrainTransform(crop_size=(50, 100), scale_range=(0.8, 1.2), flip=True,
                       strong=StrongPhotometric(jitter_prob=1.0, grayscale_prob=0.0, blur_prob=1.0))
    out = t(img, lab)
    assert out["image_strong"].shape == out["image"].shape
    pad = out["label"] == 255
    assert pad.any() and (out["image_strong"][:, pad] == 0).all() and (out["image"][:, pad] == 0).all()
    assert not torch.allclose(out["image_strong"], out["image"])
    # same geometry: strong view is a pixelwise photometric function of the weak view, so
    # their spatial structure (label boundaries) correlates strongly
    a, b = out["image"][0][~pad], out["image_strong"][0][~pad]
    assert torch.corrcoef(torch.stack([a, b]))[0, 1].abs() > 0.5


# ---------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------

def test_loaders_repeat_keys_shapes(voc):
    cfg = _cfg("pascal", voc, strong=True)
    L = build_train_loaders(cfg, seed=0, strong_views=1)
    assert len(L.labeled.dataset) == len(L.unlabeled.dataset) == 4   # 2 labeled repeated to 4
    assert len(L.samplers) == 2 and all(hasattr(s, "set_epoch") for s in L.samplers)
    assert L.labeled.drop_last and L.unlabeled.drop_last
    for s in L.samplers:
        s.set_epoch(1)
    lb, ub = next(iter(L.labeled)), next(iter(L.unlabeled))
    assert set(lb) == {"image", "label", "id"} and set(ub) == {"image", "label", "id", "image_strong"}
    assert lb["image"].shape == ub["image_strong"].shape == (2, 3, 32, 32)
    assert lb["label"].shape == (2, 32, 32) and lb["label"].dtype == torch.int64
    assert set(lb["id"]) <= {"2007_000000", "2007_000001"}
    assert (ub["label"] != 255).any()   # VOC unlabeled items carry ground truth
    ids = [i for b in L.labeled for i in b["id"]]
    assert sorted(ids) == ["2007_000000"] * 2 + ["2007_000001"] * 2
    sup = build_train_loaders(cfg, labeled_only=True)
    assert sup.unlabeled is None and len(sup.labeled.dataset) == 2 and len(sup.samplers) == 1
    tiny = build_train_loaders(_cfg("pascal", voc, batch=3), labeled_only=True, world_size=2)
    assert len(tiny.labeled) == 1 and len(tiny.labeled.dataset) == 6


def test_loaders_shard_ranks(voc):
    cfg = _cfg("pascal", voc, batch=1)
    ids = []
    for rank in (0, 1):
        L = build_train_loaders(cfg, rank=rank, world_size=2, seed=3)
        assert len(L.unlabeled) == 2
        ids.append([i for b in L.unlabeled for i in b["id"]])
    assert not set(ids[0]) & set(ids[1])


def test_items_seeded_by_epoch_and_index_not_worker(voc):
    cfg = _cfg("pascal", voc, batch=2)
    runs = {}
    for workers in (0, 2):
        cfg["dataset"]["workers"] = workers
        L = build_train_loaders(cfg, seed=5)
        L.samplers[1].set_epoch(3)
        runs[workers] = [b["image"] for b in L.unlabeled]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))
    state = torch.get_rng_state()
    ds = L.unlabeled.dataset
    x1, x2 = ds[(1, 0)]["image"], ds[(1, 0)]["image"]
    assert torch.equal(x1, x2) and not torch.equal(x1, ds[(2, 0)]["image"])
    assert torch.equal(torch.get_rng_state(), state)   # the training RNG is untouched


class _SeedProbe(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        info = torch.utils.data.get_worker_info()
        return torch.tensor([info.id if info else -1, torch.initial_seed() % 2**62, np.random.randint(2**31),
                             int(torch.randint(0, 2**31, ()))])


def _probe(rank, seed, workers=2):
    loader, sampler = build_loader(_SeedProbe(), batch_size=1, workers=workers, rank=rank, world_size=2, seed=seed)
    sampler.set_epoch(0)
    rows = torch.cat(list(loader))
    return {int(r[0]): tuple(r[1:].tolist()) for r in rows}


def test_worker_seeds_differ_per_rank_and_worker_and_follow_seed():
    r0, r1, r0_again, r0_other = _probe(0, 7), _probe(1, 7), _probe(0, 7), _probe(0, 8)
    assert len(r0) == 2 and r0[0][0] != r0[1][0]                       # per worker
    assert {v[0] for v in r0.values()}.isdisjoint({v[0] for v in r1.values()})   # per rank
    assert r0 == r0_again                                              # reproducible
    assert r0 != r0_other                                              # follows the run seed


# ---------------------------------------------------------------------------
# priors
# ---------------------------------------------------------------------------

def _prior_loop(labels, C, ignore=255):
    same = np.zeros(C)
    tot = np.zeros(C)
    for lab in labels:
        h, w = lab.shape
        for y in range(h):
            for x in range(w):
                c = lab[y, x]
                if c == ignore:
                    continue
                for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and lab[yy, xx] != ignore:
                        tot[c] += 1
                        same[c] += lab[yy, xx] == c
    return np.divide(same, tot, out=np.zeros(C), where=tot > 0)


def test_prior_matches_loop():
    rng = np.random.default_rng(0)
    labels = []
    for _ in range(3):
        small = rng.integers(0, 4, (5, 6))
        lab = np.kron(small, np.ones((3, 3), int)).astype(np.uint8)[: 14, : 17]
        lab[rng.random(lab.shape) < 0.1] = 255
        labels.append(lab)
    got, pixels = neighbor_prior(labels, 5)
    np.testing.assert_allclose(got, _prior_loop(labels, 5), rtol=0, atol=1e-12)
    assert got[4] == 0 and pixels[4] == 0 and (got[:4] > 0.5).all()


def test_prior_cli_on_toy(tmp_path):
    from s4mc.data import priors
    root = generate_toy(tmp_path / "toy", seed=1, num_train=12, num_labeled=4, num_val=2, size=48)
    out = tmp_path / "p.json"
    assert priors.main(["--type", "toy", "--root", str(root), "--list", str(root / "splits/labeled.txt"),
                        "--num-classes", "6", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res) >= {"prior", "dataset", "split"} and len(res["prior"]) == 6 and res["dataset"] == "toy"
    labels = [np.array(Image.open(root / "SegmentationClass" / f"{i}.png"))
              for i in read_split(root / "splits/labeled.txt")]
    np.testing.assert_allclose(res["prior"], _prior_loop(labels, 6), atol=1e-12)


# ---------------------------------------------------------------------------
# toy
# ---------------------------------------------------------------------------

def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def test_toy_deterministic(tmp_path):
    kw = dict(num_train=10, num_labeled=3, num_val=3, size=64)
    a = generate_toy(tmp_path / "a", seed=4, **kw)
    b = generate_toy(tmp_path / "b", seed=4, **kw)
    c = generate_toy(tmp_path / "c", seed=5, **kw)
    assert _tree_digest(a) == _tree_digest(b) != _tree_digest(c)
    assert len(read_split(a / "splits/labeled.txt")) == 3 and len(read_split(a / "splits/unlabeled.txt")) == 7
    lab = np.array(Image.open(a / "SegmentationClass/train_0000.png"))
    img = cv2.imread(str(a / "JPEGImages/train_0000.png"))
    assert lab.shape == img.shape[:2] == (64, 64) and lab.max() < 6
    with pytest.raises(FileExistsError):
        generate_toy(a, seed=4, **kw)


def test_toy_labeled_style_changes_only_the_labeled_images(tmp_path):
    from dataclasses import replace

    from s4mc.data.toy import TARGET
    kw = dict(seed=2, num_train=8, num_labeled=3, num_val=2, size=48)
    plain = generate_toy(tmp_path / "plain", **kw)
    clean = replace(TARGET, noise=(0.0, 0.5), illumination=0.0)
    shifted = generate_toy(tmp_path / "shifted", labeled_style=clean, **kw)
    labeled = set(read_split(plain / "splits/labeled.txt"))
    assert labeled == set(read_split(shifted / "splits/labeled.txt"))
    for name in read_split(plain / "splits/train_all.txt") + read_split(plain / "splits/val.txt"):
        same = (plain / f"JPEGImages/{name}.png").read_bytes() == (shifted / f"JPEGImages/{name}.png").read_bytes()
        assert same == (name not in labeled), name
        # the scene itself (shapes, labels) does not depend on the style's photometric knobs
        assert (plain / f"SegmentationClass/{name}.png").read_bytes() == \
            (shifted / f"SegmentationClass/{name}.png").read_bytes()


def test_toy_from_an_older_generator_is_refused(tmp_path):
    from s4mc.data.toy import ensure_toy
    root = generate_toy(tmp_path / "toy", num_train=6, num_labeled=2, num_val=2, size=32)
    assert ensure_toy(root) == root  # the current version passes untouched
    (root / "toy.json").unlink()     # what a folder written before toy.json existed looks like
    with pytest.raises(DataError, match=r"older generator.*--overwrite") as err:
        ensure_toy(root)
    assert str(root) in str(err.value)


def test_toy_autocreated_by_loaders(tmp_path, caplog):
    root = tmp_path / "toy"
    cfg = _cfg("toy", root, num_classes=6, crop=48)
    with caplog.at_level(logging.WARNING):
        L = build_train_loaders(cfg)
    assert (root / "splits" / "val.txt").is_file() and "toy dataset" in caplog.text
    # the default toy: 400 training images, 40 of them labeled; the labeled list is repeated to the unlabeled's
    assert len(L.labeled.dataset) == len(L.unlabeled.dataset) == 360
    b = next(iter(L.unlabeled))
    assert b["image"].shape == (2, 3, 48, 48) and int(b["label"][b["label"] != 255].max()) < 6
    v = build_val_dataset(cfg)
    assert len(v) == 100 and v[0]["image"].shape == (3, 128, 128)
