"""The real-data path a new user takes (issue 29), driven through the command lines on a generated
VOC-layout tree and a generated custom folder: the protocol that selects best.pth is the one the
header, environment.json, results.json, eval.py and the plots name; eval.py needs nothing but the
run's checkpoint; the starting point is stated; the custom template trains; split lists verify
offline and say how to place them by hand."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from s4mc.cli import eval_main, train_main
from s4mc.config import load_config
from s4mc.data import splits as splits_mod
from s4mc.engine.run_header import build_run_header, format_run_header
from s4mc.errors import CheckpointError, DataError
from s4mc.models import build_model
from test_run_header import fake_voc

REPO = Path(__file__).resolve().parents[1]
TINY_NET = ["net.encoder.type=resnet_tiny", "net.encoder.kwargs.width=8", "net.decoder.kwargs.inner_planes=16",
            "net.decoder.kwargs.low_conv_planes=16", "net.decoder.kwargs.dilations=[2,4,6]"]


@pytest.fixture(scope="module")
def voc_run(tmp_path_factory):
    """A VOC 366 run (the shipped config, a tiny net) on a generated VOC tree: 1 epoch of 6 steps,
    evaluated at its end. Its config names U2PL's ImageNet file, which is absent: the model's
    tensors come from nowhere else than the checkpoint at evaluation."""
    tmp = tmp_path_factory.mktemp("voc")
    root = fake_voc(tmp / "VOC2012")
    data_opts = [f"dataset.train.data_root={root}", f"dataset.train.data_list={root / 'splits/366/labeled.txt'}",
                 f"dataset.val.data_root={root}", f"dataset.val.data_list={root / 'splits/val.txt'}"]
    opts = [f"output_dir={tmp / 'runs'}", *data_opts, "dataset.batch_size=2", "dataset.workers=0",
            "dataset.train.crop.size=[32,32]", "dataset.val.crop.size=[40,40]", "dataset.n_sup=null",
            "net.encoder.pretrained=null", *TINY_NET, "trainer.epochs=1", "trainer.sup_only_epoch=0",
            "trainer.log_every=2"]
    config = REPO / "experiments/pascal/366/config.yaml"
    assert train_main(["--config", str(config), "--device", "cpu", "--name", "voc", "--opts", *opts]) == 0
    return {"dir": tmp / "runs" / "voc", "config": config, "data_opts": data_opts, "opts": opts}


def test_header_results_and_metrics_name_the_selecting_protocol(voc_run):
    run = voc_run["dir"]
    env = json.loads((run / "environment.json").read_text())["protocol"]
    selecting = [e["mode"] for e in env["evaluation"] if e["selects_best"]]
    results = json.loads((run / "results.json").read_text())
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert selecting == ["center_crop"] == [results["selected_by"]] == [results["final"]["mode"]]
    assert val[-1]["protocol"] == "center_crop" and val[-1]["miou"] == pytest.approx(results["best_miou"])
    log = (run / "train.log").read_text()
    assert re.search(r"evaluation +center_crop \(centre crop 40×40, padding labelled 0.*selects best\.pth", log)
    assert re.search(r"epoch 1: mIoU [\d.]+ center_crop \(best [\d.]+\), whole [\d.]+", log)

    from s4mc import plots

    loaded = plots.load_run(run)
    assert loaded["protocol"] == "center_crop"
    assert plots.axis_label({loaded["protocol"]}) == "validation mIoU (%), center_crop (selects best.pth)"
    (run / "metrics.jsonl").write_text("".join(  # a run logged before val records carried it
        json.dumps({k: v for k, v in json.loads(line).items() if k != "protocol"}) + "\n"
        for line in (run / "metrics.jsonl").read_text().splitlines()))
    assert plots.load_run(run)["protocol"] == "center_crop"  # then from environment.json


def _eval_json(args, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert eval_main([*args, "--device", "cpu", "--workers", "0", "--json", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def test_eval_on_best_pth_alone_reproduces_best_miou(voc_run, tmp_path, capsys):
    run = voc_run["dir"]
    best = json.loads((run / "results.json").read_text())["best_miou"]
    assert best > 0  # so that best.pth exists and the comparison means something
    ckpt = run / "checkpoints" / "best.pth"
    result, printed = _eval_json(["--checkpoint", str(ckpt)], tmp_path, capsys)
    assert result["mode"] == "center_crop" == result["selects_best"]
    assert result["miou"] == pytest.approx(best, abs=1e-9)
    assert result["checkpoint_best_miou"] == pytest.approx(best)
    assert "whole" in result["also"]
    assert (f"center_crop (40×40, padding labelled 0) {100 * best:.2f} (the protocol that selects best.pth; "
            f"the checkpoint records best mIoU {100 * best:.2f})") in printed

    # With the run's config file (which names an ImageNet file that is not there): the same, with no
    # flag, since evaluation never loads ImageNet weights.
    assert not (REPO / "pretrained/resnet101.pth").exists()
    opts = [o for o in voc_run["opts"] if not o.startswith("net.encoder.pretrained")]
    result, _ = _eval_json(["--config", str(voc_run["config"]), "--checkpoint", str(ckpt), "--opts", *opts],
                           tmp_path, capsys)
    assert result["mode"] == "center_crop" and result["miou"] == pytest.approx(best, abs=1e-9)

    # --mode picks one protocol; a prediction is written at the image's own size in every mode.
    preds = tmp_path / "preds"
    result, _ = _eval_json(["--checkpoint", str(ckpt), "--mode", "center_crop", "--save-dir", str(preds)],
                           tmp_path, capsys)
    assert result["also"] == {}
    pngs = sorted(p for p in preds.glob("*.png") if p.name != "legend.png")
    assert len(pngs) == 3 and (preds / "legend.png").is_file()
    assert Image.open(pngs[0]).size == (44, 36)  # fake_voc's images are 44 × 36, the val crop 40 × 40


def test_a_key_mismatch_names_the_checkpoints_config_and_the_difference(voc_run, capsys):
    ckpt = voc_run["dir"] / "checkpoints" / "best.pth"
    opts = [*voc_run["opts"], "net.encoder.kwargs.width=16"]
    code = eval_main(["--config", str(voc_run["config"]), "--checkpoint", str(ckpt), "--device", "cpu",
                      "--opts", *opts])
    assert code == 2
    err = capsys.readouterr().err
    assert f"The checkpoint was trained with {voc_run['config']}" in err
    assert "net.encoder.kwargs.width: 8 -> 16" in err and "Leave out --config" in err


def test_the_header_states_the_starting_point(voc_run, toy_root, toy_cfg, tmp_path):
    log = (voc_run["dir"] / "train.log").read_text()
    assert re.search(r"start +random: no pretrained weights \(resnet_tiny encoder\)", log)
    assert "warning: the resnet_tiny encoder starts from random weights" in log

    optimizer = __import__("torch").optim.SGD([__import__("torch").zeros(1, requires_grad=True)], lr=0.1)
    optimizer.param_groups[0]["initial_lr"] = 0.1

    def start(**over):
        cfg = toy_cfg(toy_root, tmp_path, **over)
        facts = build_run_header(cfg, world_size=1, optimizer=optimizer, iters_per_epoch=4, labeled_images=8,
                                 unlabeled_images=8, val_images=5, amp_dtype=None, channels_last=False)
        line = next(x for x in format_run_header(facts).splitlines() if x.strip().startswith("start"))
        return line.split(None, 1)[1], facts["start"]["warning"]

    assert start() == ("random: no pretrained weights (resnet_tiny encoder)", None)  # the toy: no warning
    assert start(**{"net.encoder.pretrained": "toy"})[0].startswith("toy: data/toy_pretrain/encoder.pth")
    assert start(**{"net.encoder.pretrained": "/w/r101.pth"})[0] == "file /w/r101.pth (resnet_tiny encoder)"
    text, warning = start(**{"dataset.type": "custom", "dataset.class_names": list("abcdef")})
    assert text.startswith("random") and "on the custom dataset" in warning

    with pytest.raises(CheckpointError) as info:  # the ImageNet file of the VOC configs, absent
        build_model(dict(load_config(voc_run["config"])["net"], encoder={"type": "resnet50",
                                                                         "pretrained": "/nowhere/r50.pth"}))
    assert "--opts net.encoder.pretrained=null" in str(info.value)
    assert "--opts net.encoder.type=resnet50 net.encoder.pretrained=null" in str(info.value)


def make_custom(root: Path, n: int = 24, size=(40, 48), with_masks: int = 20) -> Path:
    """A 3-class custom folder (background, crack: dark lines, stain: brown discs); the last
    n - with_masks images have no mask (unlabeled only)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    h, w = size
    for i in range(n):
        img = (rng.integers(150, 200) + rng.integers(0, 20, (h, w, 3))).astype(np.uint8)
        mask = np.zeros((h, w), np.uint8)
        centre, r = (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(4, 10))
        cv2.circle(img, centre, r, (140, 90, 40), -1)
        cv2.circle(mask, centre, r, 2, -1)
        a, b = (int(rng.integers(0, w)), 0), (int(rng.integers(0, w)), h - 1)
        cv2.line(img, a, b, (30, 30, 30), 2)
        cv2.line(mask, a, b, 1, 2)
        cv2.imwrite(str(root / "images" / f"p{i:03d}.jpg"), img[:, :, ::-1])
        if i < with_masks:
            Image.fromarray(mask).save(root / "masks" / f"p{i:03d}.png")
    return root


def test_the_custom_template_trains_and_eval_reproduces_it(tmp_path, capsys):
    root = make_custom(tmp_path / "custom")
    assert splits_mod.main(["make", "--root", str(root), "--image-dir", "images", "--mask-dir", "masks",
                            "--num-labeled", "6", "--num-val", "4", "--out", str(root / "splits")]) == 0
    template = REPO / "experiments/custom/config.yaml"
    opts = [f"output_dir={tmp_path / 'runs'}", f"dataset.train.data_root={root}",
            f"dataset.train.data_list={root / 'splits/labeled.txt'}", f"dataset.val.data_root={root}",
            f"dataset.val.data_list={root / 'splits/val.txt'}", "dataset.workers=0",
            "dataset.train.crop.size=[32,32]", "trainer.epochs=2", "trainer.sup_only_epoch=1",
            "trainer.eval_every=1", "net.encoder.kwargs.width=8"]
    capsys.readouterr()
    assert train_main(["--config", str(template), "--device", "cpu", "--opts", *opts]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "custom_seed0"  # the default name: the template's folder and the seed
    assert "custom, 6 labeled / 14 unlabeled (split lists as loaded), 4 val images" in out
    assert "measured on the 10 of 14 unlabeled images that have a mask" in out
    # A line after the first step, before log_every (10) steps have passed.
    assert re.search(r"epoch 1/2 iter 1/\d+ .*s/step \| eta ", out)
    results = json.loads((run / "results.json").read_text())
    assert results["selected_by"] == "whole" and results["iterations"] == 2 * (14 // 4)
    result, _ = _eval_json(["--checkpoint", str(run / "checkpoints" / "best.pth")], tmp_path, capsys)
    assert result["mode"] == "whole" and result["miou"] == pytest.approx(results["best_miou"], abs=1e-9)


def test_data_is_ignored_by_git_except_readmes_toy_assets_and_split_lists():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["data/custom/images/a.jpg", "data/VOC2012/JPEGImages/x.jpg", "data/toy/splits/val.txt",
             "data/splits/custom/labeled.txt", "data/README.md", "data/splits/README.md",
             "data/splits/pascal/92/labeled.txt", "data/toy_pretrain/encoder.pth", "data/toy_pretrain/encoder.json"]
    done = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True)
    assert done.stdout.split() == paths[:4]


# --------------------------------------------------------------------------- split lists

SHIPPED = REPO / "data" / "splits"


def test_fetch_for_a_config_takes_only_its_lists_and_offline_names_the_routes(tmp_path, capsys):
    cfg = load_config(REPO / "experiments/pascal/92/config.yaml")
    assert splits_mod.config_split_files(cfg) == {
        SHIPPED: ["pascal/92/labeled.txt", "pascal/92/unlabeled.txt", "pascal/val.txt"]}

    calls = []

    def offline(url):
        calls.append(url)
        raise OSError("network unreachable")

    # The shipped lists verify without a download.
    files = splits_mod.fetch_splits(SHIPPED, only=["pascal/92/labeled.txt", "pascal/val.txt"], fetcher=offline)
    assert len(files) == 2 and calls == []
    # Elsewhere, offline: one clear error that says how to place the file by hand.
    with pytest.raises(DataError) as info:
        splits_mod.fetch_splits(tmp_path / "out", only=["pascal/92"], fetcher=offline)
    text = str(info.value)
    assert "network unreachable" in text and str(tmp_path / "out/pascal/92/labeled.txt") in text
    assert f"fetch --from {SHIPPED} --out {tmp_path / 'out'}" in text
    assert "fetch --from U2PL/data/splits" in text and splits_mod.BASE_URL + "pascal/92/labeled.txt" in text
    # The first of those routes, as a user types it: only the config's three lists, verified.
    assert splits_mod.main(["fetch", "--config", str(REPO / "experiments/pascal/92/config.yaml"),
                            "--from", str(SHIPPED), "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.txt")) == [
        "pascal/92/labeled.txt", "pascal/92/unlabeled.txt", "pascal/val.txt"]
    assert "3 split files verified" in capsys.readouterr().out
    # A custom config reads no published list: said so, with the command that draws one.
    custom = load_config(REPO / "experiments/custom/config.yaml")
    with pytest.raises(DataError, match="splits make"):
        splits_mod.config_split_files(custom)


def test_splits_make_help_says_it_takes_any_layout(capsys):
    with pytest.raises(SystemExit):
        splits_mod.main(["make", "--help"])
    text = capsys.readouterr().out
    assert "any layout" in text and "VOC" in text and "--image-dir JPEGImages" in text


# --------------------------------------------------------------------------- the smaller things (item 7)

def test_n_sup_is_the_same_error_in_the_preview_as_in_training(tmp_path, capsys):
    from s4mc.engine.run_header import main as header_main

    root = fake_voc(tmp_path / "VOC2012")  # its labeled list has 4 ids; the config says n_sup 366
    opts = [f"dataset.train.data_list={root / 'splits/366/labeled.txt'}", f"dataset.val.data_list={root / 'splits/val.txt'}",
            *TINY_NET]
    assert header_main(["--config", str(REPO / "experiments/pascal/366/config.yaml"), "--opts", *opts]) == 2
    err = capsys.readouterr().err
    assert "dataset.n_sup = 366 but" in err and "lists 4 labeled images" in err and "--opts dataset.n_sup=null" in err
    assert header_main(["--config", str(REPO / "experiments/pascal/366/config.yaml"), "--opts", *opts,
                        "dataset.n_sup=null"]) == 0


def test_console_parts_unimatch_loss_adds_up_and_gamma_is_never_a_bare_zero():
    from s4mc.logs import Progress
    from s4mc.methods.unimatch import UniMatch

    cfg = load_config(REPO / "experiments/pascal_unimatch/366/config.yaml", ["net.encoder.pretrained=null"])
    u = cfg["trainer"]["unimatch"]
    raw = {"loss_sup": 0.8, "loss_s1": 0.4, "loss_s2": 0.36, "loss_fp": 0.3}
    total = (raw["loss_sup"] + u["weight_strong"] * (raw["loss_s1"] + raw["loss_s2"]) + u["weight_fp"] * raw["loss_fp"]) / 2
    progress = Progress(10, 4, 1, loss_parts=lambda values: UniMatch.console_loss_parts(cfg, values))
    parts = progress.format_parts({**raw, "loss": total, "threshold": 4.1e-4, "kept_fraction": 0.991,
                                   "kept_fraction_unrefined": 0.6})
    head, shares = parts[0].split(" = ")
    assert head == f"loss {total:.4f}"
    named = dict(share.split() for share in shares.split(" + "))
    assert list(named) == ["sup", "s1", "s2", "fp"]
    assert sum(map(float, named.values())) == pytest.approx(total, abs=2e-4)
    assert "γ 4.1e-04" in parts and "kept 99.1% (unrefined 60.0%)" in parts
    # UniMatch alone: a fixed threshold, no γ; the share that reaches it.
    assert progress.format_parts({**raw, "loss": total, "kept_fraction": 0.123})[1:] == ["kept 12.3%"]


def test_eta_counts_to_max_iters_and_is_a_lower_bound_in_the_warm_up():
    from s4mc.logs import Progress

    progress = Progress(total_iters=100, images_per_iter=2, every=5, stop_at=10)
    progress.phase_iter, progress.phase_time = 0, 0.0
    assert progress.eta(5, now=10.0) == "10s"  # 2 s per step, 5 steps to max_iters (not 95 to the schedule's end)
    assert "stops at 10 (trainer.max_iters)" in progress._position(0, 10, 5)
    warm = Progress(total_iters=100, images_per_iter=2, every=5, semi_from=20)
    warm.phase_iter, warm.phase_time = 0, 0.0
    assert warm.eta(10, now=10.0) == "at least 1m30s (warm-up pace)"
    for i in range(11, 22):  # the semi phase's pace is timed from its second step on
        warm.update({}, i)
    assert warm.phase_iter == 21


def test_workers_are_capped_at_the_usable_cpus(monkeypatch, caplog):
    from s4mc.data import loaders

    monkeypatch.setattr(loaders, "usable_cpus", lambda: 2)
    monkeypatch.setattr(loaders, "_capped_told", set())
    with caplog.at_level("INFO", logger="s4mc"):
        assert loaders.cap_workers(4) == 2 and loaders.cap_workers(4) == 2 and loaders.cap_workers(1) == 1
    assert [r.getMessage() for r in caplog.records] == ["dataset.workers 4 capped at 2, the CPUs this process may use"]


def test_a_stop_is_announced_at_once_and_torchruns_traceback_explained(monkeypatch, capfd):
    import signal

    from s4mc.engine.interrupt import announce_pending_stop, interrupted_message

    monkeypatch.delenv("RANK", raising=False)
    announce_pending_stop(signal.SIGINT)
    assert "SIGINT: stop pending; finishing the current iteration, then saving latest.pth" in capfd.readouterr().err
    monkeypatch.setenv("RANK", "1")
    announce_pending_stop(signal.SIGINT)
    assert capfd.readouterr().err == ""  # once, from rank 0
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert interrupted_message("saved.") == "saved."
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert "SignalException traceback" in interrupted_message("saved.")


def test_no_config_cites_a_file_that_is_not_in_the_repository():
    """Every document a config cites (docs/method.md, data/README.md, ...) is in the repository, so
    the run header never points a reader at a file a clone lacks. Files a run writes (runs/...) are not
    citations."""
    cited = 0
    for path in (REPO / "experiments").rglob("*.yaml"):
        for name in re.findall(r"[\w./-]+\.md\b", path.read_text(encoding="utf-8")):
            if name.startswith("runs/"):
                continue
            cited += 1
            assert (REPO / name).is_file(), f"{path} cites {name}, which is not in the repository"
    assert cited > 0  # the configs do cite documents: the check looked at something
