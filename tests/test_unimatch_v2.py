"""UniMatch V2 against its release: the DINOv2/DPT key layouts, the reduced model's forwards and one
training iteration, from the golden data in tests/data/unimatch_v2/ (its README gives the provenance
and the tolerances used here); then the method on the toy and the VOC config from the CLI."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from s4mc import cli
from s4mc.config import load_config
from s4mc.engine.batches import loader_options
from s4mc.distributed import DistInfo
from s4mc.engine import loop
from s4mc.engine.optim import poly_lr
from s4mc.engine.step import train_step
from s4mc.errors import CheckpointError
from s4mc.models import build_model, check_state_dict, draw_comp_drop_mask, dpt, load_backbone

from test_run_header import fake_voc

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "unimatch_v2"
TINY = {"num_classes": 21, "encoder": {"type": "vit_tiny"}, "decoder": {"type": "dpt"}}


def decode(x_u8: torch.Tensor) -> torch.Tensor:
    return (x_u8.to(torch.float32) - 128.0) / 64.0  # the golden data's input decoding (exact)


def ours(state_dict: dict) -> dict:
    """The release's DPT keys (backbone., head.) in this package's layout (encoder., decoder.)."""
    return {("encoder." + k[len("backbone."):] if k.startswith("backbone.") else "decoder." + k[len("head."):]): v
            for k, v in state_dict.items()}


@pytest.fixture(scope="module")
def golden_forward():
    return torch.load(DATA / "dpt_tiny_subset.pt", weights_only=True)


@pytest.fixture(scope="module")
def golden_step():
    return torch.load(DATA / "step_tiny_subset.pt", weights_only=True)


@pytest.fixture(scope="module")
def tiny_model(golden_forward):
    model = build_model(TINY)
    model.load_state_dict(ours(golden_forward["state_dict"]), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def inputs(golden_forward):
    """Cases a, b, c: regenerated from the seed (uniform noise), checked against the stored sha256."""
    generator = torch.Generator().manual_seed(golden_forward["seeds"]["inputs"])
    out = {}
    for case in "abc":
        x = torch.randint(0, 256, tuple(golden_forward[f"{case}_x_shape"]), generator=generator, dtype=torch.uint8)
        if hashlib.sha256(x.numpy().tobytes()).hexdigest() != golden_forward[f"{case}_x_sha256"]:
            pytest.fail(f"this torch's generator does not redraw the golden input of case {case}: regenerate "
                        f"tests/data/unimatch_v2 with inputs stored (subset.py) to test this version")
        out[case] = decode(x)
    return out


# ----------------------------------------------------------------------------- key layouts
@pytest.mark.parametrize("size", ["small", "base", "large"])
def test_dinov2_and_dpt_key_layouts_match_the_release(size):
    facts = json.loads((DATA / "dinov2_keys.json").read_text())["sizes"][size]
    with torch.device("meta"):  # layout only: ViT-L's 335M parameters are never allocated
        model = build_model({"num_classes": 21, "encoder": {"type": f"dinov2_{size}"}, "decoder": {"type": "dpt"}})
    encoder = {k: list(v.shape) for k, v in model.encoder.state_dict().items()}
    assert list(encoder.items()) == list(facts["backbone_state_dict"].items())  # keys, shapes and order
    whole = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert whole == ours(facts["dpt_state_dict"])
    counts = {"total": sum(p.numel() for p in model.parameters()),
              "backbone": sum(p.numel() for p in model.encoder.parameters()),
              "head": sum(p.numel() for p in model.decoder.parameters())}
    assert counts == facts["param_count"]
    assert list(model.encoder.layers) == facts["intermediate_layer_idx"]
    assert list(model.buffers()) == []
    # An official checkpoint (this layout, no prefix) fits; one key more or less is a named error.
    official = {k: torch.empty(v, device="meta") for k, v in facts["backbone_state_dict"].items()}
    check_state_dict(model.encoder, official, "dinov2.pth", "backbone weights")
    with pytest.raises(CheckpointError, match=r"1 missing key.*\n\s+norm\.bias"):
        check_state_dict(model.encoder, {k: v for k, v in official.items() if k != "norm.bias"}, "x.pth", "w")
    with pytest.raises(CheckpointError, match=r"1 unexpected key.*\n\s+head\.weight"):
        check_state_dict(model.encoder, {**official, "head.weight": torch.empty(2, device="meta")}, "x.pth", "w")


def test_a_backbone_file_in_the_official_layout_loads_strictly(tmp_path, golden_forward):
    encoder_sd = {k[len("backbone."):]: v for k, v in golden_forward["state_dict"].items() if k.startswith("backbone.")}
    torch.save(encoder_sd, tmp_path / "dinov2_tiny.pth")
    model = build_model({**TINY, "encoder": {"type": "vit_tiny", "pretrained": str(tmp_path / "dinov2_tiny.pth")}})
    assert torch.equal(model.encoder.pos_embed, encoder_sd["pos_embed"])
    torch.save({**encoder_sd, "register_tokens": torch.zeros(1, 4, 32)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="register_tokens"):
        load_backbone(build_model(TINY), tmp_path / "bad.pth")


# ----------------------------------------------------------------------------- forwards
def _sub(out, g, case):
    return out[:, :, g[f"{case}_out_rows"]][:, :, :, g[f"{case}_out_cols"]]


def _check_output(out, g, case):
    assert list(out.shape) == g[f"{case}_out_shape"]
    ref = g[f"{case}_out_sub"]
    assert (_sub(out, g, case) - ref).abs().max() <= 2e-5 * ref.abs().max()
    for name, value in ((f"{case}_out_sum", out.double().sum((2, 3))),
                        (f"{case}_out_sumsq", out.double().pow(2).sum((2, 3)))):
        ref = g[name]
        assert (value - ref).abs().max() <= 1e-3 + 1e-6 * ref.abs().max(), name


@torch.no_grad()
def test_native_grid_forward_and_intermediate_layers(tiny_model, golden_forward, inputs):
    g = golden_forward
    _check_output(tiny_model(inputs["a"])["pred"], g, "a")  # 518 px: the position embeddings untouched
    assert tiny_model.encoder.interpolate_pos_encoding(518, 518) is tiny_model.encoder.pos_embed
    feats = tiny_model.encoder.get_intermediate_layers(inputs["a"][:1])
    for ours_, ref in zip(feats, g["d_features"]):
        assert (ours_[:, g["d_tokens"]] - ref).abs().max() <= 2e-6 * ref.abs().max()


@torch.no_grad()
def test_non_square_forward_interpolates_the_position_embeddings(tiny_model, golden_forward, inputs):
    g = golden_forward
    assert (tiny_model.encoder.interpolate_pos_encoding(322, 434) - g["b_pos_embed"]).abs().max() <= 1e-6
    _check_output(tiny_model(inputs["b"])["pred"], g, "b")


@torch.no_grad()
def test_complementary_dropout_replays_the_release(tiny_model, golden_forward, inputs):
    g = golden_forward
    # Drawn from a generator seeded as the release seeded its global RNG: the same sample and permutation.
    mask = draw_comp_drop_mask(2, 32, torch.Generator().manual_seed(g["c_seed"]))
    assert torch.equal(mask, g["c_dropout_mask"])
    out = tiny_model(inputs["c"], comp_drop=(0, 4), generator=torch.Generator().manual_seed(g["c_seed"]))["pred"]
    _check_output(out, g, "c")
    replayed = tiny_model(inputs["c"], comp_drop=(0, 4), comp_drop_mask=g["c_dropout_mask"])["pred"]
    assert torch.equal(out, replayed)
    # The undropped pair (images 0 and 2) equals the plain forward; the dropped one does not.
    plain = tiny_model(inputs["c"])["pred"]
    kept = g["c_kept_indexes"].tolist()
    assert kept == [0]
    assert torch.allclose(out[[0, 2]], plain[[0, 2]], atol=1e-5)
    assert not torch.allclose(out[[1, 3]], plain[[1, 3]], atol=1e-2)


def test_other_sizes_are_padded_to_multiples_of_14(tiny_model):
    x = torch.randn(1, 3, 40, 45)
    with torch.no_grad():
        out = tiny_model(x)["pred"]
        padded = tiny_model(torch.nn.functional.pad(x, (0, 11, 0, 2)))["pred"]
    assert out.shape[-2:] == (40, 45)
    assert torch.equal(out, padded[..., :40, :45])


# ----------------------------------------------------------------------------- one training iteration
def golden_cfg(tmp_path, refine=False):
    data = {
        "output_dir": str(tmp_path),
        "dataset": {"type": "toy", "batch_size": 4, "workers": 0,
                    "train": {"data_root": str(tmp_path), "data_list": str(tmp_path / "l.txt")},
                    "val": {"data_root": str(tmp_path), "data_list": str(tmp_path / "v.txt")}},
        "trainer": {"epochs": 4, "sup_only_epoch": 0, "method": "unimatch_v2", "head_lr_mult": 40,
                    "optimizer": {"type": "adamw", "kwargs": {"lr": 5e-6, "weight_decay": 0.01}},
                    "unsupervised": {"refine": refine, "neighbor_prior": "none"}},
        "net": {"num_classes": 21, "sync_bn": False, "ema_decay": 0.996, **TINY},
    }
    return load_config(None, [], data=data)


def golden_batch(g):
    labeled = {"image": decode(g["img_x_u8"]), "label": g["mask_x"].long()}
    unlabeled = {"image": decode(g["img_u_w_u8"]), "image_strong": decode(g["img_u_s1_u8"]),
                 "image_strong_2": decode(g["img_u_s2_u8"]), "ignore_mask": g["ignore_mask"],
                 "cutmix_box1": g["cutmix_box1"], "cutmix_box2": g["cutmix_box2"]}
    return labeled, unlabeled


def golden_state(cfg, g):
    """The state at the golden iteration: epoch 1, i 3 of 5 (iteration 8 of 20), fresh AdamW state,
    teacher a copy of the student, the torch seed set right before the iteration."""
    state = loop.build_state(cfg, DistInfo(), iters_per_epoch=g["len_trainloader_u"])
    state.student.load_state_dict(ours(g["student_init"]))
    state.teacher.load_state_dict(ours(g["student_init"]))
    state.iteration, state.epoch, state.semi_start = g["iters"], g["epoch"], 0
    state.generator.manual_seed(g["seeds"]["torch_global_before_iteration"])
    return state


def _budget_fraction(new, ref, lr, unreliable):
    """|new − ref| over the README's budget: 2^-22·|p| + 1e-3·lr, or + 2·lr for unreliable entries."""
    budget = 2.0 ** -22 * ref.abs() + torch.where(unreliable, 2.0 * lr, 1e-3 * lr)
    return float(((new - ref).abs() / budget).max())


def test_one_iteration_matches_the_release(tmp_path, golden_step, monkeypatch):
    g = golden_step
    cfg = golden_cfg(tmp_path)
    state = golden_state(cfg, g)
    masks = []
    draw = dpt.draw_comp_drop_mask
    monkeypatch.setattr(dpt, "draw_comp_drop_mask", lambda *a, **k: masks.append(draw(*a, **k)) or masks[-1])

    metrics = train_step(state, [golden_batch(g)], cfg)

    # The LR the step ran with (set at the end of the release's previous iteration), and the next one.
    lrs = [group["lr"] for group in state.optimizer.param_groups]
    assert lrs == pytest.approx(g["lr_during_step"], rel=1e-12)
    assert [poly_lr(group["initial_lr"], g["iters"], g["total_iters"]) for group in state.optimizer.param_groups] \
        == pytest.approx(g["lr_after_step"], rel=1e-12)
    assert state.max_iters == g["total_iters"]
    # The Complementary Dropout draws replay the release's from the same seed.
    assert len(masks) == 1 and torch.equal(masks[0], g["comp_drop_mask"])
    # Losses, the kept share and the teacher's mask ratio.
    for ours_, ref in (("loss_sup", "loss_x"), ("loss_s1", "loss_u_s1"), ("loss_s2", "loss_u_s2"),
                       ("loss", "loss"), ("mask_ratio", "mask_ratio")):
        assert float(metrics[ours_]) == pytest.approx(float(g[ref]), rel=1e-5), ours_
    assert float(metrics["kept_fraction"]) == pytest.approx(g["kept_count_s1"] / g["valid_count_s1"], rel=1e-6)

    student = dict(state.student.named_parameters())
    teacher = dict(state.teacher.named_parameters())
    grads = ours(g["grads"])
    # Gradients: per tensor, max |Δ| ≤ 1e-4 · max |ref|; the five unused tensors have none (no decay).
    assert sorted(k for k, p in student.items() if p.grad is None) == sorted(ours({k: 0 for k in g["grad_none"]}))
    for name, ref in grads.items():
        assert (student[name].grad - ref).abs().max() <= 1e-4 * ref.abs().max(), name
    # The AdamW step and the EMA step (ratio min(1 − 1/9, 0.996)), within the README's budgets.
    after, ema_after = ours(g["student_after"]), ours(g["ema_after"])
    r = g["ema_ratio"]
    worst = {"student": 0.0, "ema": 0.0}
    for name, p in student.items():
        lr = g["lr_during_step"][0 if name.startswith("encoder.") else 1]
        unreliable = torch.zeros_like(p, dtype=torch.bool)
        if name in grads:
            ref_grad = grads[name]
            unreliable = (ref_grad != 0) & (ref_grad.abs() <= 1e-4 * ref_grad.abs().max())
            if name.endswith("attn.qkv.bias"):  # the key third: its gradient is analytically zero
                c = p.shape[0] // 3
                unreliable[c:2 * c] = True
        worst["student"] = max(worst["student"], _budget_fraction(p.detach(), after[name], lr, unreliable))
        worst["ema"] = max(worst["ema"], _budget_fraction(teacher[name], ema_after[name], lr * (1 - r), unreliable))
    assert worst["student"] <= 1 and worst["ema"] <= 1, worst
    assert len(after) == len(student) == 125 and g["buffers"] == [] and list(state.teacher.buffers()) == []


def test_s4mc_replaces_the_threshold_on_both_views(tmp_path, golden_step):
    g = golden_step
    cfg = golden_cfg(tmp_path, refine=True)
    metrics = train_step(golden_state(cfg, g), [golden_batch(g)], cfg)
    # Same losses' structure, another selection: S4MC keeps its keep-percent schedule's share.
    assert {"loss_s1", "loss_s2", "keep_percent", "threshold"} <= set(metrics)
    assert float(metrics["loss"]) == pytest.approx(
        float((metrics["loss_sup"] + (metrics["loss_s1"] + metrics["loss_s2"]) / 2) / 2), rel=1e-6)
    assert float(metrics["loss_s1"]) != pytest.approx(float(g["loss_u_s1"]), rel=1e-3)


def test_the_loaders_padding_is_the_releases_ignore_mask(tmp_path, golden_step):
    """The loaders' `padding` (true on the crop's padded border) trains exactly as the release's
    ignore_mask (255 there): the golden iteration's losses, from the padding mask alone."""
    g = golden_step
    cfg = golden_cfg(tmp_path)
    labeled, unlabeled = golden_batch(g)
    padding = dict(unlabeled, padding=unlabeled.pop("ignore_mask") == 255)
    metrics = train_step(golden_state(cfg, g), [(labeled, padding)], cfg)
    for ours_, ref in (("loss_sup", "loss_x"), ("loss_s1", "loss_u_s1"), ("loss_s2", "loss_u_s2")):
        assert float(metrics[ours_]) == pytest.approx(float(g[ref]), rel=1e-5), ours_
    assert loader_options(cfg)["padding_mask"]  # so the loaders mark it


# ----------------------------------------------------------------------------- the CLI
def variants_rows() -> dict:
    spec = importlib.util.spec_from_file_location("variants", REPO / "benchmarks" / "variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.VARIANTS


@pytest.mark.parametrize("row", ["unimatch_v2", "s4mc_unimatch_v2"])
def test_a_tiny_vit_trains_on_the_toy_from_the_cli(toy_root, tmp_path, capsys, row):
    refine = row.startswith("s4mc")
    opts = [*variants_rows()[row], f"output_dir={tmp_path}",
            f"dataset.train.data_root={toy_root}", f"dataset.train.data_list={toy_root / 'splits/labeled.txt'}",
            f"dataset.train.unlabeled_list={toy_root / 'splits/unlabeled.txt'}",
            f"dataset.val.data_root={toy_root}", f"dataset.val.data_list={toy_root / 'splits/val.txt'}",
            "dataset.batch_size=2", "dataset.workers=0", "dataset.train.crop.size=[40,40]",
            "trainer.sup_only_epoch=0", "trainer.max_iters=2", "trainer.log_every=1", "evaluation.compare_with=null"]
    code = cli.train_main(["--config", str(REPO / "experiments/toy/config.yaml"), "--device", "cpu",
                           "--name", "v2", "--opts", *opts])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    assert "UniMatch V2" in out.out and ("S4MC" in out.out) is refine
    results = json.loads((tmp_path / "v2" / "results.json").read_text())
    assert results["iterations"] == 2
    assert set(results["final_also"]) == {"student_whole"}  # the teacher selects, the student is reported


def test_the_voc_config_without_dinov2_weights_stops_with_one_error(tmp_path, capsys):
    if (REPO / "pretrained" / "dinov2_base.pth").exists():
        pytest.skip("pretrained/dinov2_base.pth exists in this checkout")
    root = fake_voc(tmp_path / "VOC2012")
    code = cli.train_main(["--config", str(REPO / "experiments/pascal_unimatch_v2/366/config.yaml"), "--device", "cpu",
                           "--opts", f"output_dir={tmp_path / 'runs'}", f"dataset.train.data_root={root}",
                           f"dataset.val.data_root={root}"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(re.findall(r"^error", err, re.M)) == 1 and "Traceback" not in err
    assert str(REPO / "pretrained" / "dinov2_base.pth") in err
    assert "dinov2_vitb14_pretrain.pth" in err and "dl.fbaipublicfiles.com/dinov2" in err
    assert not (tmp_path / "runs").exists()


def test_the_voc_config_with_official_layout_weights_runs_on_the_cpu(tmp_path, capsys):
    facts = json.loads((DATA / "dinov2_keys.json").read_text())["sizes"]["small"]["backbone_state_dict"]
    generator = torch.Generator().manual_seed(0)
    weights = {k: 0.02 * torch.randn(shape, generator=generator) for k, shape in facts.items()}  # DINOv2-S, random
    torch.save(weights, tmp_path / "dinov2_small.pth")
    root = fake_voc(tmp_path / "VOC2012")
    opts = [f"output_dir={tmp_path / 'runs'}",
            f"dataset.train.data_root={root}", f"dataset.train.data_list={root / 'splits/366/labeled.txt'}",
            f"dataset.val.data_root={root}", f"dataset.val.data_list={root / 'splits/val.txt'}",
            "dataset.n_sup=null", "dataset.batch_size=2", "dataset.workers=0", "dataset.train.crop.size=[28,28]",
            "net.encoder.type=dinov2_small", f"net.encoder.pretrained={tmp_path / 'dinov2_small.pth'}",
            "trainer.max_iters=2", "trainer.log_every=1", "trainer.eval_on=false"]
    code = cli.train_main(["--config", str(REPO / "experiments/pascal_unimatch_v2/366/config.yaml"),
                           "--device", "cpu", "--name", "voc", "--opts", *opts])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    block = out.out[out.out.index("run protocol:"):]
    assert "UniMatch V2 (EMA teacher, decay 0.996" in block and "fixed confidence threshold 0.95" in block
    assert re.search(r"backbone 5e-06, head 0\.0002 ", block)
    assert "88.90 mIoU (UniMatch V2" in block
    assert f"loaded backbone weights from {tmp_path / 'dinov2_small.pth'} (175 tensors)" in out.out + out.err
    assert " iter 2/" in (tmp_path / "runs" / "voc" / "train.log").read_text()


def test_the_configs_target_the_readme_numbers():
    tables = {"pascal_unimatch_v2": ((92, 183, 366, 732, 1464), "UniMatch V2, VOC classic"),
              "cityscapes_unimatch_v2": ((186, 372, 744, 1488), "UniMatch V2, Cityscapes"),
              "ade20k_unimatch_v2": ((316, 631, 1263, 2526), "UniMatch V2, DINOv2-Base (UniMatch V2's README)")}
    for family, (splits, label) in tables.items():
        numbers = dict(zip(splits, _readme_row_any(label)))
        assert numbers, label
        for split in splits:
            cfg = load_config(REPO / "experiments" / family / str(split) / "config.yaml")
            assert cfg["recipe"]["published_miou"] == numbers[split], (family, split)
            assert cfg["trainer"]["method"] == "unimatch_v2" and cfg["net"]["decoder"]["type"] == "dpt"
            assert cfg["trainer"]["unsupervised"]["refine"] is False  # the published method; S4MC is the switch
            assert cfg["trainer"]["optimizer"]["type"] == "adamw" and cfg["trainer"]["head_lr_mult"] == 40


def _readme_row_any(label: str) -> list[float]:
    """A README table row of numbers (any number of columns)."""
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label and all(re.fullmatch(r"[\d.]+", c) for c in cells[1:]):
            return [float(c) for c in cells[1:]]
    return []
