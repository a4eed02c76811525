"""COCO (81 classes, UniMatch's masks) and ADE20K (150 classes, 0 = other) on tiny generated trees in their
real layouts, the COCO id table, the Xception-65 encoder's key layout and shapes, and two-iteration CPU
runs of experiments/coco_unimatch/925 shrunk with --opts (on COCO, and pointed at ADE20K)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from s4mc.cli import eval_main, train_main
from s4mc.data import SegmentationDataset, build_samples
from s4mc.data import coco as coco_mod
from s4mc.data import priors
from s4mc.data.classes import COCO_CATEGORY_IDS, COCO_CLASSES, COCO_UNANNOTATED_IDS
from s4mc.data.splits import MANUAL_SPLITS, check_split, fetch_splits
from s4mc.errors import CheckpointError, ConfigError, DataError
from s4mc.models import build_model, load_backbone
from s4mc.models.xception import Xception65

REPO = Path(__file__).resolve().parents[1]
KEYS = json.loads((REPO / "tests/data/xception65_keys.json").read_text())


def _image(path: Path, h: int, w: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _mask(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8), mode="L").save(path)


def _blocky(h: int, w: int, classes: list[int], seed: int) -> np.ndarray:
    """Rectangles of a few classes (so neighbours mostly agree), with an ignore border of 255."""
    rng = np.random.default_rng(seed)
    m = np.full((h, w), classes[0], np.uint8)
    for c in classes[1:]:
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        m[y:y + 8, x:x + 10] = c
    return m


def fake_coco(root: Path, n_train: int = 6, n_labeled: int = 2, n_val: int = 2) -> Path:
    """data/coco as UniMatch lays it out: train2017/, val2017/, masks/ (one folder for both), and
    UniMatch's `image mask` split lines under splits/coco/925/."""
    lines = {"train": [], "val": []}
    for split, n, off in (("train", n_train, 0), ("val", n_val, 100)):
        for i in range(n):
            cid = f"{off + i:012d}"
            _image(root / f"{split}2017/{cid}.jpg", 40, 52, off + i)
            m = _blocky(40, 52, [0, 1 + (i % 80), 80 - (i % 3)], off + i)
            m[0, :] = 255
            _mask(root / f"masks/{cid}.png", m)
            lines[split].append(f"{split}2017/{cid}.jpg masks/{cid}.png")
    _write_splits(root / "splits/coco", "925", lines["train"], n_labeled, lines["val"])
    return root


def fake_ade20k(root: Path, n_train: int = 6, n_labeled: int = 2, n_val: int = 2) -> Path:
    """ADEChallengeData2016: images/{training,validation}/ADE_*.jpg and the official annotations
    annotations/{training,validation}/ADE_*.png (0 = other, 1..150)."""
    lines = {"training": [], "validation": []}
    for split, n, tag in (("training", n_train, "train"), ("validation", n_val, "val")):
        for i in range(n):
            name = f"ADE_{tag}_{i + 1:08d}"
            _image(root / f"images/{split}/{name}.jpg", 44, 36, i)
            _mask(root / f"annotations/{split}/{name}.png", _blocky(44, 36, [1 + i, 0, 150], i))
            lines[split].append(f"images/{split}/{name}.jpg annotations/{split}/{name}.png")
    _write_splits(root / "splits/ade20k", "631", lines["training"], n_labeled, lines["validation"])
    return root


def _write_splits(folder: Path, split: str, train: list[str], n_labeled: int, val: list[str]) -> None:
    """<folder>/<split>/{labeled,unlabeled}.txt (the first n_labeled lines labeled) and <folder>/val.txt."""
    (folder / split).mkdir(parents=True)
    (folder / split / "labeled.txt").write_text("\n".join(train[:n_labeled]) + "\n")
    (folder / split / "unlabeled.txt").write_text("\n".join(train[n_labeled:]) + "\n")
    (folder / "val.txt").write_text("\n".join(val) + "\n")


# ----------------------------------------------------------------------------------------- loading


def test_coco_loads_unimatch_lines_and_image_only_lines(tmp_path):
    root = fake_coco(tmp_path / "coco")
    samples = build_samples("coco", root, root / "splits/coco/925/labeled.txt", require_masks=True)
    assert [s.id for s in samples] == ["000000000000", "000000000001"]
    ds = SegmentationDataset(samples, num_classes=81)
    image, label = ds.load(1)
    assert image.shape == (40, 52, 3)
    stored = np.array(Image.open(root / "masks/000000000001.png"))
    assert np.array_equal(label, stored) and label.max() == 255 and 2 in label  # as stored: UniMatch's classes
    # A line with the image alone finds its mask in masks/ by the image's name.
    (root / "one.txt").write_text("val2017/000000000100.jpg\n")
    (only,) = build_samples("coco", root, root / "one.txt", require_masks=True)
    assert only.mask == str(root / "masks/000000000100.png")
    res = check_split("coco", root, root / "splits/coco/val.txt")
    assert res["missing_images"] == [] and res["missing_masks"] == [] and len(res["total"]) == 2


def test_ade20k_ignores_other_and_shifts_the_classes_down(tmp_path):
    root = fake_ade20k(tmp_path / "ade")
    samples = build_samples("ade20k", root, root / "splits/ade20k/631/labeled.txt", require_masks=True)
    ds = SegmentationDataset(samples, num_classes=150)
    raw = np.array(Image.open(samples[1].mask))
    _, label = ds.load(1)
    assert set(np.unique(raw).tolist()) == {0, 2, 150}
    assert np.array_equal(label == 255, raw == 0)
    assert np.array_equal(label[raw > 0], raw[raw > 0] - 1)
    assert set(np.unique(label).tolist()) == {1, 149, 255}
    # An image-only line takes annotations/<split>/<name>.png.
    (root / "one.txt").write_text("images/validation/ADE_val_00000001.jpg\n")
    (only,) = build_samples("ade20k", root, root / "one.txt", require_masks=True)
    assert only.mask == str(root / "annotations/validation/ADE_val_00000001.png")


def test_a_label_outside_the_classes_is_a_named_error(tmp_path):
    root = fake_coco(tmp_path / "coco")
    bad = root / "masks/000000000000.png"
    m = np.array(Image.open(bad))
    m[5, 5] = 90  # a COCO category id, not a class index
    _mask(bad, m)
    ds = SegmentationDataset(build_samples("coco", root, root / "splits/coco/925/labeled.txt", require_masks=True),
                             num_classes=81)
    with pytest.raises(DataError, match=r"values \[90\] outside \[0, 81\).*000000000000\.png.*COCO category ids"):
        ds.load(0)
    # ADE20K: a value above 150 (e.g. an already shifted mask's 255) is refused, not silently ignored.
    ade = fake_ade20k(tmp_path / "ade")
    ann = ade / "annotations/training/ADE_train_00000001.png"
    m = np.array(Image.open(ann))
    m[0, 0] = 255
    _mask(ann, m)
    ds = SegmentationDataset(build_samples("ade20k", ade, ade / "splits/ade20k/631/labeled.txt", require_masks=True),
                             num_classes=150)
    with pytest.raises(DataError, match=r"values \[255\] above 150: .*ADE_train_00000001\.png.*shifted twice"):
        ds.load(0)
    # A line outside the layout names the file and the line.
    (root / "bad.txt").write_text("JPEGImages/x.jpg masks/x.png\n")
    with pytest.raises(DataError, match=r"bad\.txt: coco split lines start with an image path under train2017/"):
        build_samples("coco", root, root / "bad.txt", require_masks=False)


def test_coco_id_table_round_trip_and_converter(tmp_path):
    assert len(COCO_CATEGORY_IDS) == 80 and len(COCO_CLASSES) == 81
    assert sorted(COCO_CATEGORY_IDS + COCO_UNANNOTATED_IDS) == list(range(1, 92))
    ids = np.array([[0] + COCO_CATEGORY_IDS + [255]], np.uint8)
    classes = coco_mod.coco_ids_to_classes(ids)
    assert classes.tolist() == [list(range(81)) + [255]]
    assert np.array_equal(coco_mod.classes_to_coco_ids(classes), ids)
    # Named classes land where COCO's ids say: person 1 -> 1, toothbrush 90 -> 80, dining table 67 -> 61.
    for cid, name in ((1, "person"), (90, "toothbrush"), (67, "dining table"), (13, "stop sign")):
        assert COCO_CLASSES[int(coco_mod.coco_ids_to_classes(np.array([cid], np.uint8))[0])] == name
    for unannotated in COCO_UNANNOTATED_IDS:
        with pytest.raises(DataError, match=rf"m\.png: values \[{unannotated}\] are not"):
            coco_mod.coco_ids_to_classes(np.array([[1, unannotated]], np.uint8), path="m.png")
    with pytest.raises(DataError, match=r"values \[81\] are not COCO class indices"):
        coco_mod.classes_to_coco_ids(np.array([81], np.uint8))
    _mask(tmp_path / "ids/a/x.png", ids)
    assert coco_mod.main(["--src", str(tmp_path / "ids"), "--dst", str(tmp_path / "out")]) == 0
    assert np.array_equal(np.array(Image.open(tmp_path / "out/a/x.png")), classes)
    _mask(tmp_path / "ids/a/y.png", np.array([[12]]))
    assert coco_mod.main(["--src", str(tmp_path / "ids"), "--dst", str(tmp_path / "out")]) == 2


def test_fetch_refuses_the_unverified_lists_and_says_how_to_place_them(tmp_path):
    calls = []
    for name, folder in (("coco", "925"), ("ade20k", "631")):
        with pytest.raises(DataError, match=rf"no verified checksums.*{MANUAL_SPLITS[name]['source']}.*"
                                            rf"{name}/{folder}/"):
            fetch_splits(tmp_path, only=[f"{name}/{folder}"], fetcher=calls.append)
    assert calls == [] and not any(tmp_path.iterdir())


def test_priors_cli_measures_a_coco_prior_from_the_labeled_split(tmp_path):
    root = fake_coco(tmp_path / "coco")
    out = tmp_path / "prior.json"
    assert priors.main(["--type", "coco", "--root", str(root), "--list", str(root / "splits/coco/925/labeled.txt"),
                        "--num-classes", "81", "--out", str(out)]) == 0
    prior = json.loads(out.read_text())["prior"]
    assert len(prior) == 81 and 0.5 < prior[0] < 1 and prior[40] == 0  # class 40 never appears
    with pytest.raises(ConfigError, match="python -m s4mc.data.priors --config CONFIG --out"):
        priors.resolve_prior(str(tmp_path / "missing.json"), 81, "coco")


# ----------------------------------------------------------------------------------------- Xception-65


@pytest.fixture(scope="module")
def xception():
    torch.manual_seed(0)
    return Xception65(output_stride=16).eval()


def test_xception65_state_dict_matches_unimatchs_layout(xception):
    ours = [[k, list(v.shape)] for k, v in xception.state_dict().items()]
    assert len(ours) == KEYS["num_keys"] == 792
    assert ours == KEYS["keys"]
    assert sum(p.numel() for p in xception.parameters()) == KEYS["num_parameters"]
    assert all(m.momentum == 0.0003 for m in xception.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_xception65_forward_shapes_at_output_stride_16_and_8(xception):
    with torch.no_grad():
        c1, c4 = xception(torch.randn(1, 3, 65, 65))
    assert [list(c1.shape), list(c4.shape)] == [KEYS["forward_65x65"]["os16"]["c1"], KEYS["forward_65x65"]["os16"]["c4"]]
    assert xception.out_channels == (KEYS["out_channels"]["c1"], KEYS["out_channels"]["c4"])
    narrow = Xception65(output_stride=8, width=8).eval()  # same strides, 1/8 of the channels
    with torch.no_grad():
        c1, c4 = narrow(torch.randn(1, 3, 65, 65))
    assert c1.shape[-2:] == tuple(KEYS["forward_65x65"]["os8"]["c1"][-2:])
    assert c4.shape[-2:] == tuple(KEYS["forward_65x65"]["os8"]["c4"][-2:])
    assert (c1.shape[1], c4.shape[1]) == narrow.out_channels == (32, 256)


def test_xception65_identity_blocks_add_relu_of_their_input():
    block = Xception65(width=8).block4.eval()
    x = torch.randn(1, 91, 6, 6)
    for m in (block.sepconv1, block.sepconv2, block.sepconv3):
        torch.nn.init.zeros_(m.bn2.weight)  # the convolution branch contributes 0 (its BN bias is 0)
    with torch.no_grad():
        out, _ = block(x)
    assert torch.equal(out, torch.relu(x))


def test_xception65_is_built_from_the_config_and_loads_its_checkpoint_strictly(tmp_path):
    net = {"num_classes": 81, "encoder": {"type": "xception65", "kwargs": {"width": 8, "multi_grid": True,
                                                                          "replace_stride_with_dilation": [False, False, True]}},
           "decoder": {"kwargs": {"inner_planes": 16, "low_conv_planes": 8, "dilations": [6, 12, 18], "rep_head": False}}}
    model = build_model(net)
    assert model.decoder.low_conv[0].in_channels == 32 and model.decoder.aspp.conv2[0].in_channels == 256
    # A file in UniMatch's layout: no num_batches_tracked (UniMatch filters "track" keys out anyway).
    sd = {k: torch.randn(v.shape) if v.is_floating_point() else v for k, v in model.encoder.state_dict().items()
          if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "xception.pth")
    load_backbone(model, tmp_path / "xception.pth")
    assert torch.equal(model.encoder.block7.sepconv2.pointwise.weight, sd["block7.sepconv2.pointwise.weight"])
    del sd["block20.skipbn.running_var"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"(?s)1 missing key.*block20\.skipbn\.running_var"):
        load_backbone(model, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="UniMatch's README"):
        load_backbone(model, tmp_path / "absent.pth")
    with pytest.raises(ConfigError, match="output stride 16 .* or 8"):
        build_model({**net, "encoder": {"type": "xception65", "kwargs": {"replace_stride_with_dilation": [False, False, False]}}})
    with pytest.raises(ConfigError, match="net.aux_loss: the xception65 encoder has no layer3"):
        build_model({**net, "aux_loss": {"loss_weight": 0.4}})


# ----------------------------------------------------------------------------------------- two-iteration runs


def _tiny_run_opts(tmp_path: Path, root: Path, labeled: Path, val: Path, prior: Path) -> list[str]:
    return [
        f"output_dir={tmp_path / 'runs'}",
        f"dataset.train.data_root={root}", f"dataset.train.data_list={labeled}",
        f"dataset.val.data_root={root}", f"dataset.val.data_list={val}",
        "dataset.n_sup=null", "dataset.batch_size=2", "dataset.workers=0",
        "dataset.train.crop.size=[33,33]", "dataset.val.crop.size=[33,33]",
        "net.sync_bn=false", "net.encoder.pretrained=null", "net.encoder.kwargs.width=8",
        "net.decoder.kwargs.inner_planes=16", "net.decoder.kwargs.low_conv_planes=8",
        f"trainer.unsupervised.neighbor_prior={prior}", "trainer.max_iters=2", "trainer.log_every=1",
    ]


def test_coco_925_config_trains_two_iterations_on_the_cpu_and_evaluates(tmp_path, capsys):
    root = fake_coco(tmp_path / "coco")
    labeled, val = root / "splits/coco/925/labeled.txt", root / "splits/coco/val.txt"
    prior = tmp_path / "coco_925.json"
    assert priors.main(["--type", "coco", "--root", str(root), "--list", str(labeled), "--num-classes", "81",
                        "--out", str(prior)]) == 0
    config = REPO / "experiments/coco_unimatch/925/config.yaml"
    code = train_main(["--config", str(config), "--device", "cpu", "--name", "coco", "--opts",
                       *_tiny_run_opts(tmp_path, root, labeled, val, prior)])
    assert code == 0
    out = capsys.readouterr().out
    assert "COCO 1/128, 2 labeled / 4 unlabeled (split lists as loaded), 2 val images" in out
    assert "method      UniMatch (single model), margin threshold, S4MC refinement on" in out
    assert "target      no published number (S4MC paper, COCO 1/128 (925 labels)" in out
    results = json.loads((tmp_path / "runs/coco/results.json").read_text())
    assert results["iterations"] == 2
    final = results["final"]
    assert final["num_images"] == 2 and len(final["iou"]) == 81 and 0.0 <= final["miou"] <= 1.0
    ckpt = tmp_path / "runs/coco/checkpoints/latest.pth"
    code = eval_main(["--config", str(config), "--checkpoint", str(ckpt), "--device", "cpu",
                      "--json", str(tmp_path / "eval.json"), "--opts",
                      *_tiny_run_opts(tmp_path, root, labeled, val, prior)])
    assert code == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["num_images"] == 2 and evaluated["miou"] == pytest.approx(final["miou"], abs=1e-6)


def test_ade20k_trains_two_iterations_on_the_cpu_and_evaluates(tmp_path):
    root = fake_ade20k(tmp_path / "ade")
    labeled, val = root / "splits/ade20k/631/labeled.txt", root / "splits/ade20k/val.txt"
    prior = tmp_path / "ade_631.json"
    assert priors.main(["--type", "ade20k", "--root", str(root), "--list", str(labeled), "--num-classes", "150",
                        "--out", str(prior)]) == 0
    code = train_main(["--config", str(REPO / "experiments/coco_unimatch/925/config.yaml"), "--device", "cpu",
                       "--name", "ade", "--opts", "dataset.type=ade20k", "net.num_classes=150",
                       "recipe.dataset=ADE20K 1/32", *_tiny_run_opts(tmp_path, root, labeled, val, prior)])
    assert code == 0
    final = json.loads((tmp_path / "runs/ade/results.json").read_text())["final"]
    assert final["num_images"] == 2 and len(final["iou"]) == 150


def test_ade20k_unimatch_v2_config_trains_two_iterations_and_evaluates(tmp_path):
    """The shipped ADE20K UniMatch V2 config, on a fake ADE20K tree, with a tiny ViT (no DINOv2 file)."""
    root = fake_ade20k(tmp_path / "ade")
    labeled, val = root / "splits/ade20k/631/labeled.txt", root / "splits/ade20k/val.txt"
    code = train_main(["--config", str(REPO / "experiments/ade20k_unimatch_v2/631/config.yaml"), "--device", "cpu",
                       "--name", "ade_v2", "--opts", f"output_dir={tmp_path / 'runs'}",
                       f"dataset.train.data_root={root}", f"dataset.train.data_list={labeled}",
                       f"dataset.val.data_root={root}", f"dataset.val.data_list={val}", "dataset.n_sup=null",
                       "dataset.workers=0", "dataset.train.crop.size=[28,28]", "net.encoder.type=vit_tiny",
                       "net.encoder.pretrained=null", "trainer.unsupervised.neighbor_prior=none",
                       "trainer.max_iters=2", "trainer.log_every=1"])
    assert code == 0
    results = json.loads((tmp_path / "runs/ade_v2/results.json").read_text())
    assert results["iterations"] == 2 and len(results["final"]["iou"]) == 150
    assert results["final"]["num_images"] == 2
