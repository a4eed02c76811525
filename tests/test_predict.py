"""eval.py --images: predictions on a folder of generated images, with a corrupt file among them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import free_port
from PIL import Image

from s4mc.cli import eval_main
from s4mc.data.datasets import load_image
from s4mc.evaluation import configured_inference
from s4mc.predict import PredictSummary, list_images, predict_folder, shard
from test_eval_cli import setup, u2pl_checkpoint  # noqa: F401 (setup is a fixture)

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def make_folder(root: Path) -> dict[str, tuple[int, int]]:
    """Images in several formats and nested folders, a corrupt one and some non-images.

    Returns {relative path of each readable image: (height, width)}.
    """
    rng = np.random.default_rng(0)
    sizes = {"a.png": (23, 31), "b.jpg": (20, 17), "C.JPEG": (18, 25), "d.bmp": (16, 16), "e.tif": (21, 19),
             "f.webp": (19, 22), "sub/a.png": (15, 27), "sub/deeper/g.tiff": (26, 14),
             "x.png": (17, 17), "x.jpg": (17, 18)}
    for rel, (h, w) in sizes.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), rel
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all")
    (root / "notes.txt").write_text("not an image")
    cv2.imwrite(str(root / ".hidden.png"), np.zeros((8, 8, 3), np.uint8))
    return sizes


class ChannelArgmax(torch.nn.Module):
    """Class c = the normalised colour channel c: a pixel-wise model whose prediction is known."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.scale


def expected_prediction(path: Path) -> np.ndarray:
    rgb = load_image(str(path)).astype(np.float32)
    return ((rgb - np.array(MEAN, np.float32)) / np.array(STD, np.float32)).argmax(axis=2)


@pytest.mark.parametrize("mode, flip", [("whole", False), ("sliding", True)])
def test_predict_folder_writes_one_png_per_image_at_its_size(tmp_path, toy_root, toy_cfg, mode, flip):
    images = tmp_path / "images"
    sizes = make_folder(images)
    out = images / "preds"  # inside the input folder: must not be read back as input
    cfg = toy_cfg(toy_root, tmp_path, **{"evaluation.mode": mode, "evaluation.flip": flip,
                                         "evaluation.crop_size": [12, 12], "dataset.mean": MEAN,
                                         "dataset.std": STD})
    infer = configured_inference(ChannelArgmax().eval(), cfg)
    palette = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
    summary = predict_folder(infer, images, out, class_names=["r", "g", "b"], palette=palette, mean=MEAN,
                             std=STD, overlay=True)
    assert summary.written == sorted(sizes)
    assert [s["file"] for s in summary.skipped] == ["sub/broken.jpg"]
    assert "broken.jpg" in summary.skipped[0]["error"]
    # x.png and x.jpg would both become x.png: each keeps its suffix instead.
    expected_out = {rel: Path(rel).with_suffix(".png") for rel in sizes}
    expected_out.update({"x.png": Path("x.png.png"), "x.jpg": Path("x.jpg.png")})
    for rel, (h, w) in sizes.items():
        png = Image.open(out / expected_out[rel])
        assert png.mode == "P" and png.size == (w, h), rel
        np.testing.assert_array_equal(np.array(png), expected_prediction(images / rel), err_msg=rel)
        overlay = out / expected_out[rel].with_name(expected_out[rel].stem + "_overlay.png")
        assert Image.open(overlay).size == (w, h), rel
    legend = Image.open(out / "legend.png")
    assert legend.height >= 3 * 14
    assert {(255, 0, 0), (0, 255, 0)} <= {c for _, c in legend.convert("RGB").getcolors(100000)}
    produced = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png") if not p.name.endswith("_overlay.png"))
    assert produced == sorted([p.as_posix() for p in expected_out.values()] + ["legend.png"])
    # A second run does not read the first run's predictions (under the input folder) as images.
    assert list_images(images, exclude=out) == sorted(Path(rel) for rel in [*sizes, "sub/broken.jpg"])


def test_predict_folder_without_images_is_a_clear_error(tmp_path, toy_root, toy_cfg):
    from s4mc.errors import DataError

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    infer = configured_inference(ChannelArgmax(), toy_cfg(toy_root, tmp_path))
    with pytest.raises(DataError, match="empty: no image files"):
        predict_folder(infer, tmp_path / "empty", tmp_path / "out", class_names=["a"], palette=[[0, 0, 0]],
                       mean=MEAN, std=STD)
    with pytest.raises(DataError, match="nowhere: no such folder"):
        predict_folder(infer, tmp_path / "nowhere", tmp_path / "out", class_names=["a"], palette=[[0, 0, 0]],
                       mean=MEAN, std=STD)


@pytest.fixture
def toy_checkpoint(setup, tmp_path):
    """eval.py's test config (toy data, tiny net) and a checkpoint of its model."""
    _, cfg_path, model = setup
    ckpt = tmp_path / "ckpt.pth"
    u2pl_checkpoint(model, ckpt)
    return cfg_path, ckpt


def test_eval_images_cli(tmp_path, toy_checkpoint, capsys):
    cfg_path, ckpt = toy_checkpoint
    images = tmp_path / "images"
    sizes = make_folder(images)
    out, result = tmp_path / "preds", tmp_path / "predictions.json"
    code = eval_main(["--config", str(cfg_path), "--checkpoint", str(ckpt), "--images", str(images),
                      "--save-dir", str(out), "--overlay", "--json", str(result), "--workers", "0",
                      "--device", "cpu", "--flip"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"wrote {len(sizes)} predictions, skipped 1 unreadable: sub/broken.jpg (into {out}" in printed
    summary = json.loads(result.read_text())
    assert summary["num_written"] == len(sizes) and summary["num_skipped"] == 1
    for rel, (h, w) in sizes.items():
        name = rel + ".png" if rel.startswith("x.") else str(Path(rel).with_suffix(".png"))
        png = Image.open(out / name)
        assert png.size == (w, h) and png.mode == "P"
        assert int(np.array(png).max()) < 6  # the toy config's 6 classes
    assert (out / "legend.png").is_file() and (out / "a_overlay.png").is_file()


@pytest.mark.parametrize("n_files, world_size", [(11, 1), (11, 2), (11, 4), (3, 5), (0, 3)])
def test_shard_gives_every_file_to_exactly_one_rank(n_files, world_size):
    files = [Path(f"dir{i % 3}/img{i}.png") for i in range(n_files)]
    shares = [shard(files, rank, world_size) for rank in range(world_size)]
    together = [f for share in shares for f in share]
    assert sorted(together) == sorted(files) and len(together) == len(files)  # each once, none lost
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # balanced to within one file
    with pytest.raises(ValueError, match="rank 2 is not one of the 2 process"):
        shard(files, 2, 2)


def test_summary_line_counts_written_and_skipped():
    summary = PredictSummary(written=["a.png", "b.png"], skipped=[{"file": "sub/bad.jpg", "error": "x"}],
                             seconds=1.25, legend="out/legend.png")
    assert summary.format("out") == ("wrote 2 predictions, skipped 1 unreadable: sub/bad.jpg "
                                     "(into out in 1.2s; class colours: out/legend.png)")
    assert PredictSummary(written=["a.png"]).format("o").startswith("wrote 1 predictions, skipped 0 unreadable (")


def test_eval_images_needs_save_dir(toy_checkpoint, tmp_path, capsys):
    cfg_path, ckpt = toy_checkpoint
    with pytest.raises(SystemExit):
        eval_main(["--config", str(cfg_path), "--checkpoint", str(ckpt), "--images", str(tmp_path)])
    assert "--images needs --save-dir" in capsys.readouterr().err




@pytest.mark.slow
def test_eval_images_under_torchrun_writes_every_image_once(tmp_path, toy_checkpoint):
    cfg_path, ckpt = toy_checkpoint
    images = tmp_path / "images"
    sizes = make_folder(images)
    out, result = tmp_path / "preds", tmp_path / "predictions.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "eval.py"), "--config", str(cfg_path), "--checkpoint", str(ckpt), "--images", str(images),
           "--save-dir", str(out), "--json", str(result), "--workers", "0", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(result.read_text())
    # Both ranks' shares together: every readable image once, the corrupt one skipped once.
    assert summary["written"] == sorted(sizes)
    assert [s["file"] for s in summary["skipped"]] == ["sub/broken.jpg"]
    assert proc.stdout.count("wrote ") == 1  # one summary, from rank 0
    assert f"wrote {len(sizes)} predictions, skipped 1 unreadable: sub/broken.jpg" in proc.stdout
    assert len([p for p in out.rglob("*.png") if p.name != "legend.png"]) == len(sizes)


def test_a_truncated_jpeg_is_named_in_training_and_skipped_by_images(tmp_path, toy_root, toy_cfg):
    """libjpeg decodes a cut JPEG with a grey lower part and only warnings: it must not train or be
    predicted silently."""
    from s4mc.data.datasets import SegmentationDataset, build_samples
    from s4mc.errors import DataError

    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for name in ("a", "b", "c"):
        assert cv2.imwrite(str(tmp_path / "images" / f"{name}.jpg"), rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
        Image.fromarray(np.zeros((40, 48), np.uint8)).save(tmp_path / "masks" / f"{name}.png")
    cut = tmp_path / "images" / "b.jpg"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    assert cv2.imread(str(cut)) is not None  # what made it silent: cv2 decodes it
    (tmp_path / "train.txt").write_text("a\nb\nc\n")
    samples = build_samples("custom", tmp_path, tmp_path / "train.txt", require_masks=True,
                            image_dir="images", mask_dir="masks")
    dataset = SegmentationDataset(samples, num_classes=2)
    assert dataset[0]["image"].shape[1:] == (40, 48) and dataset[2]["image"].shape[1:] == (40, 48)
    with pytest.raises(DataError, match=rf"incomplete JPEG.*truncated.*{cut}"):
        dataset[1]
    # A trailer after the end-of-image marker (some cameras write one) is not a cut file.
    trailer = tmp_path / "images" / "c.jpg"
    trailer.write_bytes(trailer.read_bytes() + b"\0" * 100 + b"maker notes")
    assert dataset[2]["image"].shape[1:] == (40, 48)

    cfg = toy_cfg(toy_root, tmp_path, **{"dataset.mean": MEAN, "dataset.std": STD})
    infer = configured_inference(ChannelArgmax().eval(), cfg)
    summary = predict_folder(infer, tmp_path / "images", tmp_path / "preds", class_names=["r", "g", "b"],
                             palette=[[0, 0, 0], [255, 0, 0], [0, 255, 0]], mean=MEAN, std=STD)
    assert summary.written == ["a.jpg", "c.jpg"]
    assert [s["file"] for s in summary.skipped] == ["b.jpg"] and "incomplete JPEG" in summary.skipped[0]["error"]
    assert "skipped 1 unreadable: b.jpg" in summary.format(tmp_path / "preds")
