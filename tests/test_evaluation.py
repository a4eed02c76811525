"""Tests for s4mc.evaluation and s4mc.palette (CPU, a few seconds)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import free_port
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from s4mc.errors import DataError
from s4mc.data.loaders import UnpaddedDistributedSampler, build_val_loader
from s4mc.evaluation import (
    evaluate,
    format_table,
    metrics_from_confusion,
)
from s4mc.palette import cityscapes_palette, generate_palette, save_prediction, voc_palette

IGNORE = 255


# --------------------------------------------------------------------------- helpers


class Identity(nn.Module):
    """Stub model: the 'image' already is the logit map, so predictions are fixed."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))  # gives evaluate() a device to infer

    def forward(self, x):
        return {"pred": x}


class PixelLinear(nn.Module):
    """1x1 conv: each pixel's logits depend on that pixel only, so the prediction of a
    pixel is the same whatever window, padding or flip it is seen in."""

    def __init__(self, num_classes, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, num_classes, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g))

    def forward(self, x):
        return {"pred": self.conv(x)}


class QuarterRes(nn.Module):
    """Predicts at 1/4 resolution, like DeepLabv3+."""

    def __init__(self, num_classes):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 3, padding=1)

    def forward(self, x):
        return {"pred": self.conv(F.avg_pool2d(x, 4, ceil_mode=True))}


def make_dataset(sizes, channels, num_classes, seed=0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i, (h, w) in enumerate(sizes):
        image = torch.randn(channels, h, w, generator=g)
        label = torch.randint(0, num_classes, (h, w), generator=g)
        label[torch.rand(h, w, generator=g) < ignore_frac] = IGNORE
        items.append({"image": image, "label": label, "id": f"img{i}"})
    return items


def numpy_scores(preds, labels, num_classes):
    """Independent reference: confusion matrix with np.add.at, IoU per class."""
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, l in zip(preds, labels):
        p, l = np.asarray(p).ravel(), np.asarray(l).ravel()
        keep = l != IGNORE
        np.add.at(conf, (l[keep], p[keep]), 1)
    ious = []
    for c in range(num_classes):
        tp = conf[c, c]
        union = conf[c, :].sum() + conf[:, c].sum() - tp
        ious.append(tp / union if union else float("nan"))
    ious = np.array(ious)
    return conf, ious, np.nanmean(ious), np.trace(conf) / conf.sum()


def loader(items, **kw):
    return build_val_loader(items, workers=0, **kw)


# --------------------------------------------------------------------------- metrics


def test_miou_matches_numpy_reference():
    c = 6
    items = make_dataset([(17, 23), (31, 12), (8, 40), (25, 25)], channels=c, num_classes=c)
    result = evaluate(Identity(), loader(items), num_classes=c)

    preds = [it["image"].argmax(0).numpy() for it in items]
    labels = [it["label"].numpy() for it in items]
    conf, ious, miou, acc = numpy_scores(preds, labels, c)
    np.testing.assert_array_equal(result.confusion, conf)
    np.testing.assert_allclose(result.iou, ious, rtol=1e-12)
    assert result.miou == pytest.approx(miou, rel=1e-12)
    assert result.pixel_acc == pytest.approx(acc, rel=1e-12)
    assert result.num_images == 4 and result.mode == "whole"
    assert result.images_per_s > 0 and result.refined is None


def test_low_resolution_logits_are_upsampled_align_corners():
    c = 4
    items = make_dataset([(30, 22), (19, 33)], channels=3, num_classes=c, seed=3)
    model = QuarterRes(c)
    result = evaluate(model, loader(items), num_classes=c)
    preds = []
    with torch.no_grad():
        for it in items:
            logits = model(it["image"][None])["pred"]
            up = F.interpolate(logits, size=it["image"].shape[-2:], mode="bilinear", align_corners=True)
            preds.append(up.argmax(1)[0].numpy())
    conf, *_ = numpy_scores(preds, [it["label"].numpy() for it in items], c)
    np.testing.assert_array_equal(result.confusion, conf)


def test_absent_classes_are_excluded_from_mean():
    c = 5
    items = make_dataset([(20, 20), (15, 30)], channels=c, num_classes=c, seed=1)
    for it in items:
        it["image"][[2, 4]] = -1e4  # never predicted
        lab = it["label"]
        lab[(lab == 2) | (lab == 4)] = IGNORE  # never in the ground truth
        lab[0, 0] = 3  # 3 present in ground truth (and maybe predicted)
        it["image"][3] = -1e4  # ... but class 3 is never predicted: IoU 0, still counted
    result = evaluate(Identity(), loader(items), num_classes=c)
    assert result.present == [True, True, False, True, False]
    assert result.excluded == [2, 4]
    assert math.isnan(result.iou[2]) and math.isnan(result.iou[4])
    assert result.iou[3] == 0.0
    assert result.miou == pytest.approx(np.mean([result.iou[0], result.iou[1], 0.0]))

    names = ["bg", "cat", "dog", "car", "tree"]
    table = format_table(result, names)
    last = table.splitlines()[-1]
    assert last.startswith("mIoU") and f"{100 * result.miou:.2f}" in last and "3 of 5" in last
    assert "dog, tree" in table
    js = result.to_json(names)
    json.dumps(js, allow_nan=False)  # NaN must have become None
    assert js["iou"][2] is None and js["excluded"] == [2, 4]


def test_metrics_from_confusion_edge_cases():
    iou, miou, acc, present = metrics_from_confusion(np.zeros((3, 3), dtype=np.int64))
    assert math.isnan(miou) and math.isnan(acc) and present == [False] * 3
    iou, miou, acc, present = metrics_from_confusion(np.array([[5, 0], [0, 0]]))
    assert iou[0] == 1.0 and math.isnan(iou[1]) and miou == 1.0 and acc == 1.0


def test_bad_labels_and_shapes_raise_data_error():
    c = 3
    items = make_dataset([(10, 10)], channels=c, num_classes=c, seed=2)
    items[0]["label"][4, 5] = 7
    with pytest.raises(DataError, match=r"label value 7 in image 'img0'"):
        evaluate(Identity(), loader(items), num_classes=c)

    bad_shape = [{"image": torch.randn(c, 10, 10), "label": torch.zeros(10, 11, dtype=torch.long), "id": "odd"}]
    with pytest.raises(DataError, match="odd"):
        evaluate(Identity(), loader(bad_shape), num_classes=c)

    items = make_dataset([(10, 10)], channels=c + 1, num_classes=c, seed=2)
    with pytest.raises(DataError, match="predicts 4 classes"):
        evaluate(Identity(), loader(items), num_classes=c)


# --------------------------------------------------------------------------- protocols


def _preds(model, items, **kw):
    saved = {}
    result = evaluate(model, loader(items), save_fn=lambda i, p, img: saved.__setitem__(i, p), **kw)
    return result, saved


@pytest.mark.parametrize("window", [(32, 32), (24, 40)])
def test_sliding_window_equals_whole_image_for_pixelwise_model(window):
    # Images smaller than, equal to and larger than the window (and mixed: taller but
    # narrower). For a 1x1-conv model every pixel's softmax is the same in every window
    # and in the padded area-free crop, so the argmax must match exactly.
    c = 7
    sizes = [(20, 25), window, (70, 45), (50, 17), (33, 97)]
    items = make_dataset(sizes, channels=3, num_classes=c, seed=4)
    model = PixelLinear(c)
    whole, p_whole = _preds(model, items, num_classes=c)
    slide, p_slide = _preds(model, items, num_classes=c, mode="sliding", crop_size=list(window), stride_rate=2 / 3)
    np.testing.assert_array_equal(whole.confusion, slide.confusion)
    for key in p_whole:
        assert p_whole[key].dtype == np.uint8
        np.testing.assert_array_equal(p_whole[key], p_slide[key])
    assert slide.mode == "sliding" and slide.options["crop_size"] == list(window)


def test_center_crop_protocol_padding_label():
    c = 4
    items = make_dataset([(20, 26), (30, 30)], channels=3, num_classes=c, seed=5)
    model = PixelLinear(c, seed=1)
    whole = evaluate(model, loader(items), num_classes=c)
    # Crop larger than every image: nothing is cut; padding labelled ignore scores
    # exactly the real pixels, the same as whole-image inference.
    cc = evaluate(model, loader(items), num_classes=c, mode="center_crop", crop_size=32)
    np.testing.assert_array_equal(cc.confusion, whole.confusion)
    # U2PL labelled the padding 0: every padding pixel becomes ground-truth class 0.
    u2pl = evaluate(model, loader(items), num_classes=c, mode="center_crop", crop_size=32, pad_label=0)
    padding = (32 * 32 - 20 * 26) + (32 * 32 - 30 * 30)
    assert u2pl.confusion[0].sum() - whole.confusion[0].sum() == padding
    np.testing.assert_array_equal(u2pl.confusion[1:], whole.confusion[1:])
    # A crop smaller than the image keeps only the centre window.
    small = evaluate(model, loader(items[1:]), num_classes=c, mode="center_crop", crop_size=(10, 12))
    lab = items[1]["label"][10:20, 9:21]
    assert small.confusion.sum() == int((lab != IGNORE).sum())


def test_multiscale_and_flip_run():
    c = 5
    items = make_dataset([(21, 29), (40, 36)], channels=3, num_classes=c, seed=6)
    model = PixelLinear(c, seed=2)
    base = evaluate(model, loader(items), num_classes=c)
    flipped = evaluate(model, loader(items), num_classes=c, flip=True)
    np.testing.assert_array_equal(base.confusion, flipped.confusion)  # pixelwise model is flip-equivariant
    for mode, extra in (("whole", {}), ("sliding", {"crop_size": 24})):
        r = evaluate(QuarterRes(c), loader(items), num_classes=c, mode=mode, scales=(0.5, 1.0, 1.5), flip=True, **extra)
        assert r.num_images == 2 and r.confusion.sum() == sum(int((it["label"] != IGNORE).sum()) for it in items)
        assert 0.0 <= r.miou <= 1.0 and r.options["scales"] == [0.5, 1.0, 1.5] and r.options["flip"]


def test_amp_dtype_keeps_fp32_scoring():
    c = 3
    items = make_dataset([(16, 16)], channels=3, num_classes=c, seed=7)
    r = evaluate(QuarterRes(c), loader(items), num_classes=c, amp_dtype=torch.bfloat16)
    assert r.num_images == 1 and r.options["amp_dtype"] == "bfloat16"


def test_refined_result_from_same_pass():
    c = 4
    items = make_dataset([(12, 14), (9, 20)], channels=c, num_classes=c, seed=8)

    def swap01(prob):  # a stand-in refinement that changes predictions predictably
        return prob[:, [1, 0, 2, 3]]

    r = evaluate(Identity(), loader(items), num_classes=c, refine=swap01)
    labels = [it["label"].numpy() for it in items]
    base = [it["image"].argmax(0).numpy() for it in items]
    ref = [it["image"][[1, 0, 2, 3]].argmax(0).numpy() for it in items]
    np.testing.assert_array_equal(r.confusion, numpy_scores(base, labels, c)[0])
    np.testing.assert_array_equal(r.refined.confusion, numpy_scores(ref, labels, c)[0])
    assert "refined" in format_table(r)


def test_refine_with_s4mc_method():
    method = pytest.importorskip("s4mc.pseudo_label")
    c = 3
    items = make_dataset([(11, 13)], channels=c, num_classes=c, seed=9)
    r = evaluate(Identity(), loader(items), num_classes=c, refine={"neighbors": 8, "k": 1, "prior": [0.1, 0.2, 0.3]})
    prob = torch.softmax(items[0]["image"][None], 1)
    ref = method.refine(prob, neighbors=8, k=1, prior=torch.tensor([0.1, 0.2, 0.3])).argmax(1)[0].numpy()
    np.testing.assert_array_equal(r.refined.confusion, numpy_scores([ref], [items[0]["label"].numpy()], c)[0])


# --------------------------------------------------------------------------- distributed


@pytest.mark.parametrize("n,world", [(7, 2), (7, 3), (5, 3), (2, 3), (0, 2)])
def test_unpadded_sampler_covers_every_index_once(n, world):
    seen = []
    for rank in range(world):
        s = UnpaddedDistributedSampler(n, num_replicas=world, rank=rank)
        idx = list(s)
        assert len(idx) == len(s)
        seen += idx
    assert sorted(seen) == list(range(n))


def _dist_items():
    return make_dataset([(13 + i, 17 + 2 * i) for i in range(5)], channels=3, num_classes=4, seed=10)


def _dist_worker(rank, world, port, out_path):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        items = _dist_items()
        ld = build_val_loader(items, rank=rank, world_size=world, workers=0)
        r = evaluate(PixelLinear(4, seed=3), ld, num_classes=4, refine=lambda p: p.flip(1))
        if rank == 0:
            torch.save({"conf": r.confusion, "ref": r.refined.confusion, "n": r.num_images, "miou": r.miou}, out_path)
    finally:
        dist.destroy_process_group()




def test_two_process_gloo_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "rank0.pt"
    mp.spawn(_dist_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)

    single = evaluate(PixelLinear(4, seed=3), loader(_dist_items()), num_classes=4, refine=lambda p: p.flip(1))
    assert got["n"] == 5 == single.num_images
    np.testing.assert_array_equal(got["conf"], single.confusion)
    np.testing.assert_array_equal(got["ref"], single.refined.confusion)
    assert got["miou"] == single.miou


# --------------------------------------------------------------------------- palettes


def test_palettes():
    voc = voc_palette()
    assert voc.shape == (256, 3) and voc.dtype == np.uint8
    assert voc[0].tolist() == [0, 0, 0] and voc[1].tolist() == [128, 0, 0] and voc[15].tolist() == [192, 128, 128]
    assert voc[255].tolist() == [224, 224, 192]
    cs = cityscapes_palette()
    assert cs.shape == (19, 3) and cs[0].tolist() == [128, 64, 128] and cs[18].tolist() == [119, 11, 32]
    gen = generate_palette(40)
    assert gen.shape == (40, 3) and len({tuple(c) for c in gen}) == 40
    with pytest.raises(ValueError):
        generate_palette(300)


def test_save_prediction_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 21, size=(23, 31)).astype(np.uint8)
    image = rng.integers(0, 256, size=(23, 31, 3)).astype(np.uint8)
    written = save_prediction(tmp_path / "sub" / "a.png", pred, voc_palette()[:21], image=image, overlay_alpha=0.5)
    assert [p.name for p in written] == ["a.png", "a_overlay.png"]
    with Image.open(written[0]) as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.array(im), pred)
        assert im.getpalette()[3:6] == [128, 0, 0]
    with Image.open(written[1]) as ov:
        assert ov.size == (31, 23) and ov.mode == "RGB"
    with pytest.raises(DataError):
        save_prediction(tmp_path / "b.png", np.full((2, 2), 300), voc_palette())


def test_save_fn_hook_writes_predictions(tmp_path):
    c = 4
    items = make_dataset([(12, 15), (9, 9)], channels=3, num_classes=c, seed=11)
    pal = generate_palette(c)

    def save(image_id, pred, image):
        assert image.shape[-2:] == pred.shape
        save_prediction(tmp_path / f"{image_id}.png", pred, pal)

    evaluate(PixelLinear(c), loader(items), num_classes=c, save_fn=save)
    assert sorted(os.listdir(tmp_path)) == ["img0.png", "img1.png"]
    with Image.open(tmp_path / "img1.png") as im:
        assert np.array(im).shape == (9, 9) and np.array(im).max() < c
