"""UniMatch exact to its release, against data measured from UniMatch's own code
(tests/data/unimatch_v1/README.md): its DeepLabv3+ key layout and forwards, the stem's
ceil_mode, the FP path, one `trainer.unimatch.release_exact` step, its CutMix box, its loaders.
Items 1-7 are those of docs/method.md, "UniMatch release-exact"."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from s4mc import mixing
from s4mc.config import load_config
from s4mc.data import build_train_loaders
from s4mc.engine.batches import build_partner_loader, epoch_batches, loader_options
from s4mc.engine.optim import build_optimizer, poly_lr
from s4mc.engine.run_header import build_run_header, format_run_header
from s4mc.engine.state import TrainState
from s4mc.engine.step import train_step
from s4mc.errors import ConfigError
from s4mc.methods import build_method, describe_method
from s4mc.methods import unimatch as unimatch_mod
from s4mc.models import build_model, from_unimatch_layout, load_checkpoint, to_unimatch_layout

DATA = Path(__file__).parent / "data" / "unimatch_v1"
REPO = Path(__file__).resolve().parents[1]
IGNORE = 255
OS16 = {"multi_grid": False, "zero_init_residual": False, "replace_stride_with_dilation": [False, False, True]}
UNIMATCH_DECODER = {"type": "deeplabv3_plus_unimatch",
                    "kwargs": {"inner_planes": 256, "low_conv_planes": 48, "dilations": [6, 12, 18], "rep_head": False}}


def net_config(depth: str = "resnet50", ceil_mode: bool | None = False) -> dict:
    return {"num_classes": 21, "sync_bn": False, "encoder": {"type": depth, "kwargs": {**OS16, "ceil_mode": ceil_mode}},
            "decoder": UNIMATCH_DECODER}


def recipe_tensor(key: str, shape: tuple) -> torch.Tensor:
    """The golden data's weight of UniMatch key `key` (the README's recipe)."""
    g = torch.Generator().manual_seed(int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16))
    if key.endswith(".num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    if key.endswith(".weight") and len(shape) == 4:
        return torch.randn(shape, generator=g) * (1.25 / math.sqrt(shape[1] * shape[2] * shape[3]))
    if key.endswith(".bn3.weight"):
        return torch.rand(shape, generator=g) * 0.2 + 0.1
    if key.endswith(".weight"):
        return torch.rand(shape, generator=g) + 0.5
    if key.endswith((".bias", ".running_mean")):
        return torch.rand(shape, generator=g) * 0.2 - 0.1
    if key.endswith(".running_var"):
        return torch.rand(shape, generator=g) + 0.5
    raise KeyError(key)


def recipe_weights(model) -> dict:
    """UniMatch-named recipe weights for every entry of `model`'s state dict."""
    return {k: recipe_tensor(k, tuple(v.shape)) for k, v in to_unimatch_layout(model.state_dict()).items()}


def decode(u8: torch.Tensor) -> torch.Tensor:
    return (u8.to(torch.float32) - 128.0) / 64.0


def stats(t: torch.Tensor) -> torch.Tensor:
    t = t.double()
    return torch.stack([t.sum(), (t ** 2).sum(), t.abs().max(), t.abs().sum()])


def scale_of(ref_stats: torch.Tensor) -> torch.Tensor:
    # The README's scale per column: sum|x| for the sum and sum|x| columns, the value itself otherwise.
    return torch.stack([ref_stats[:, 3], ref_stats[:, 1], ref_stats[:, 2], ref_stats[:, 3]], 1)


def assert_close_to_max(mine, ref, rel, what):
    bound = rel * ref.abs().max()
    assert (mine.double() - ref.double()).abs().max() <= bound, what


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the golden data ran on one thread; so do these tests
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def forward_ref():
    return torch.load(DATA / "forward.pt", weights_only=True)


@pytest.fixture(scope="module")
def r50(one_thread):
    model = build_model(net_config())
    weights = recipe_weights(model)
    model.load_state_dict(from_unimatch_layout(weights), strict=True)
    return model.eval(), weights


# --------------------------------------------------------------------------- item 1: the decoder


@pytest.mark.parametrize("depth", ["resnet50", "resnet101"])
def test_key_layout_is_unimatchs_key_for_key(depth):
    ref = json.loads((DATA / "keys.json").read_text())["models"][depth]
    model = build_model(net_config(depth))
    ours = to_unimatch_layout(model.state_dict())
    assert list(ours) == list(ref["state_dict"])  # the same keys, in UniMatch's module order
    assert {k: list(v.shape) for k, v in ours.items()} == ref["state_dict"]
    count = {"total": sum(p.numel() for p in model.parameters()),
             "backbone": sum(p.numel() for p in model.encoder.parameters()),
             "head": sum(p.numel() for p in model.decoder.parameters())}
    assert count == ref["param_count"]


def test_the_recipe_rebuilds_the_stored_weights(r50, forward_ref):
    _, weights = r50
    keys = forward_ref["recipe_keys_r50"]
    assert sorted(weights) == keys
    sums = torch.stack([torch.stack([weights[k].double().sum(), (weights[k].double() ** 2).sum()]) for k in keys])
    torch.testing.assert_close(sums, forward_ref["recipe_checksums_r50"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", ["odd", "even"])
def test_decoder_forward_matches_unimatch(r50, forward_ref, case):
    model, _ = r50
    ref = forward_ref
    x = decode(ref[f"{case}_x_u8"])
    with torch.no_grad():
        feats = model.encoder(x)
        out = F.interpolate(model(x)["pred"], size=x.shape[-2:], mode="bilinear", align_corners=True)
    assert list(feats[0].shape) == ref[f"{case}_c1_shape"] and list(feats[3].shape) == ref[f"{case}_c4_shape"]
    assert list(out.shape) == ref[f"{case}_out_shape"]
    sub = out[:, :, ref[f"{case}_out_rows"]][:, :, :, ref[f"{case}_out_cols"]]
    assert_close_to_max(sub, ref[f"{case}_out_sub"], 1e-5, "logits")
    for what, value in (("sum", out.double().sum((2, 3))), ("sumsq", (out.double() ** 2).sum((2, 3)))):
        reference = ref[f"{case}_out_{what}"]
        assert (value - reference).abs().max() <= 1e-6 + 1e-5 * reference.abs().max(), what
    if case == "odd":
        for i, name in ((0, "c1"), (3, "c4")):
            reference = ref[f"odd_{name}_sum"]
            assert (feats[i].double().sum((2, 3)) - reference).abs().max() <= 1e-6 + 1e-5 * reference.abs().max()


# --------------------------------------------------------------------------- item 2: the stem


def test_the_stem_pools_without_ceil_mode_only_when_asked(r50, forward_ref):
    """64 px: UniMatch's stem gives layer1 16x16; the deep stem's default (ceil_mode, U2PL) 17x17."""
    model, weights = r50
    default = build_model(net_config(ceil_mode=None))
    default.load_state_dict(from_unimatch_layout(weights))
    assert default.encoder.maxpool.ceil_mode and not model.encoder.maxpool.ceil_mode
    x = decode(forward_ref["even_x_u8"])
    with torch.no_grad():
        assert list(default.eval().encoder(x)[0].shape[-2:]) == [17, 17]
        assert list(model.encoder(x)[0].shape[-2:]) == forward_ref["even_c1_shape"][-2:] == [16, 16]
        odd = decode(forward_ref["odd_x_u8"])  # at an odd size both give UniMatch's logits
        torch.testing.assert_close(default(odd)["pred"], model(odd)["pred"], rtol=0, atol=0)


# --------------------------------------------------------------------------- item 1 (FP): dropout on c1, c4


def test_fp_path_replays_the_recorded_masks_and_draws_them_in_unimatchs_order(r50, forward_ref):
    model, _ = r50
    ref = forward_ref
    x = decode(ref["odd_x_u8"])

    def run():
        with torch.no_grad():
            out = model(x, perturb=(0, x.shape[0]), dropout=0.5)  # eval mode: the dropout still drops
        return {k: F.interpolate(v, size=x.shape[-2:], mode="bilinear", align_corners=True) for k, v in out.items()}

    model.fp_replay = [ref["fp_mask_c1"], ref["fp_mask_c4"]]
    replayed = run()
    assert model.fp_replay == []
    model.fp_replay = None
    sub = replayed["pred_fp"][:, :, ref["fp_outfp_rows"]][:, :, :, ref["fp_outfp_cols"]]
    assert_close_to_max(sub, ref["fp_outfp_sub"], 1e-5, "FP logits")
    assert (replayed["pred_fp"].double().sum((2, 3)) - ref["fp_outfp_sum"]).abs().max() <= 1e-6 + 1e-5 * ref["fp_outfp_sum"].abs().max()
    # The clean half is the plain forward (its BN batch holds the FP copies only in training mode).
    with torch.no_grad():
        plain = F.interpolate(model(x)["pred"], size=x.shape[-2:], mode="bilinear", align_corners=True)
    torch.testing.assert_close(replayed["pred"], plain, rtol=0, atol=0)
    # Drawn afresh from the reference's seed: two channel masks, layer1's first, so the same output.
    torch.manual_seed(ref["fp_seed"])
    drawn = run()
    torch.testing.assert_close(drawn["pred_fp"], replayed["pred_fp"], rtol=0, atol=0)


# --------------------------------------------------------------------------- items 3-6: one step


def release_config(**unimatch) -> dict:
    return load_config(None, [], data={
        "dataset": {"type": "pascal", "batch_size": 2, "train": {"data_root": "unused", "data_list": "unused"},
                    "val": {"data_root": "unused", "data_list": "unused"}},
        "trainer": {"method": "unimatch", "epochs": 80, "sup_only_epoch": 0, "head_lr_mult": 10,
                    "optimizer": {"kwargs": {"lr": 0.001, "momentum": 0.9, "weight_decay": 0.0001}},
                    "unsupervised": {"refine": False, "mix_prob": 0.5},
                    "unimatch": {"release_exact": True, **unimatch}},
        "net": net_config(),
    })


def test_one_release_exact_step_matches_unimatchs(one_thread, monkeypatch):
    ref = torch.load(DATA / "step.pt", weights_only=True)
    cfg = release_config()
    model = build_model(cfg["net"])
    weights = recipe_weights(model)
    for key in ("classifier.weight", "classifier.bias"):
        weights[key] = weights[key] * ref["step_classifier_scale"]
    model.load_state_dict(from_unimatch_layout(weights))
    optimizer = build_optimizer(model, cfg, world_size=1)
    state = TrainState(student=model, teacher=model, optimizer=optimizer, device=torch.device("cpu"),
                       max_iters=ref["total_iters"], iters_per_epoch=ref["len_trainloader_u"],
                       generator=torch.Generator().manual_seed(0), method=build_method(cfg),
                       epoch=ref["epoch"], iteration=ref["iters"])
    no_label = torch.full(ref["mask_x"].shape, IGNORE, dtype=torch.long)
    labeled = {"image": decode(ref["img_x_u8"]), "label": ref["mask_x"].long()}
    unlabeled = {"image": decode(ref["img_u_w_u8"]), "image_strong": decode(ref["img_u_s1_u8"]),
                 "image_strong_2": decode(ref["img_u_s2_u8"]), "label": no_label, "padding": ref["ignore_mask"] == 255,
                 "partner_image": decode(ref["img_u_w_mix_u8"]), "partner_image_strong": decode(ref["img_u_s1_mix_u8"]),
                 "partner_image_strong_2": decode(ref["img_u_s2_mix_u8"]), "partner_label": no_label,
                 "partner_padding": ref["ignore_mask_mix"] == 255}

    # Replay the reference's CutMix boxes (view 1, then view 2) and FP masks; record what the step scores.
    boxes = [ref["cutmix_box1"].bool(), ref["cutmix_box2"].bool()]
    monkeypatch.setattr(unimatch_mod.mixing, "sample_mix_mask", lambda *a, **k: boxes.pop(0))
    model.fp_replay = [ref["fp_mask_c1"], ref["fp_mask_c4"]]
    targets, outputs = [], []
    ce = unimatch_mod.masked_ce_sum
    monkeypatch.setattr(unimatch_mod, "masked_ce_sum", lambda s, t, i: targets.append(t) or ce(s, t, i))
    model.register_forward_hook(lambda module, args, out: outputs.append(
        {k: F.interpolate(v.detach(), size=(65, 65), mode="bilinear", align_corners=True).double().sum((2, 3))
         for k, v in out.items()}))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    metrics = train_step(state, [(labeled, unlabeled)], cfg)

    # Item 6: iteration 37 steps with lr(36), the LR UniMatch left after iteration 36.
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(ref["lr_before_step"], rel=1e-12)
    assert [poly_lr(g["initial_lr"], ref["iters"], ref["total_iters"]) for g in optimizer.param_groups] == \
        pytest.approx(ref["lr_after_step"], rel=1e-12)
    # Items 3-5: the losses, the kept pixels and UniMatch's mask ratio.
    for ours, theirs in (("loss_sup", "loss_x"), ("loss_s1", "loss_u_s1"), ("loss_s2", "loss_u_s2"),
                         ("loss_fp", "loss_u_w_fp"), ("loss", "loss"), ("mask_ratio", "mask_ratio")):
        assert float(metrics[ours]) == pytest.approx(float(ref[theirs]), rel=1e-5), ours
    assert [int((t != IGNORE).sum()) for t in targets] == [ref["kept_count"][b] for b in ("s1", "s2", "fp")]
    # Item 3: three forwards (mix teacher; labeled + weak with FP; both strong views), logits per plane.
    assert [sorted(o) for o in outputs] == [["pred"], ["pred", "pred_fp"], ["pred"]]
    sums = {"pred_u_w_mix_sum": outputs[0]["pred"], "pred_x_sum": outputs[1]["pred"][:2],
            "pred_u_w_sum": outputs[1]["pred"][2:], "pred_x_fp_sum": outputs[1]["pred_fp"][:2],
            "pred_u_w_fp_sum": outputs[1]["pred_fp"][2:], "pred_u_s1_sum": outputs[2]["pred"][:2],
            "pred_u_s2_sum": outputs[2]["pred"][2:]}
    for name, value in sums.items():
        assert (value - ref[name]).abs().max() <= 1e-6 + 1e-5 * ref[name].abs().max(), name
    # BN: two training forwards, so every layer counted two batches; its statistics after them.
    buffers = to_unimatch_layout(dict(model.named_buffers()))
    assert {int(v) for k, v in buffers.items() if k.endswith("num_batches_tracked")} == set(ref["num_batches_tracked_after"])
    assert [k for k in buffers if k.endswith(("running_mean", "running_var"))] == ref["bn_buffer_names"]
    bn = torch.stack([stats(buffers[k]) for k in ref["bn_buffer_names"]])
    assert ((bn - ref["bn_buffer_stats_after"]).abs() / scale_of(ref["bn_buffer_stats_after"])).max() <= 1e-5
    for key, value in ref["buffers_after"].items():
        assert_close_to_max(buffers[key], value, 1e-5, key)

    params = to_unimatch_layout(dict(model.named_parameters()))
    assert list(params) == ref["param_names"]
    # SGD on its own (fresh momentum): every update is -lr_group * (g + 1e-4 p), to float32 rounding.
    for name, p in model.named_parameters():
        lr = optimizer.param_groups[0 if name.startswith("encoder.") else 1]["lr"]
        expected = before[name] - lr * (p.grad + 1e-4 * before[name])
        assert (p.detach() - expected).abs().max() <= 2 * 2.0 ** -23 * before[name].abs().max() + 1e-12, name
    # Gradients: the README's 1e-3 on each stat. Our forward is not bitwise UniMatch's (2e-6 in the
    # logits), so a ReLU input within rounding of 0 may flip; the README allows one or two tensors
    # off by up to 2e-2 for that. Measured here: one tensor (layer2.1.bn1.weight, max|g|) at 1.2e-3.
    grads = torch.stack([stats(params[n].grad) for n in ref["param_names"]])
    off = (grads - ref["grad_stats"]).abs() / scale_of(ref["grad_stats"])
    assert off.max() <= 2e-2 and int((off > 1e-3).any(1).sum()) <= 2, off.max(0).values
    for key in ("classifier.weight", "classifier.bias", "reduce.1.weight", "reduce.1.bias"):
        assert_close_to_max(params[key].grad, ref["grads_full"][key], 1e-3, key)
    # The deepest gradient carries that flip too: measured 9.7e-4 of max|g| against the README's 1e-3.
    assert_close_to_max(params["backbone.conv1.0.weight"].grad, ref["grads_full"]["backbone.conv1.0.weight"], 2e-3,
                        "conv1.0 gradient")
    # Updates: 1e-3 plus one float32 ulp of p per entry (the README's floor).
    ulp = 2.0 ** -23
    before = to_unimatch_layout(before)
    updates = torch.stack([stats(params[n].detach() - before[n]) for n in ref["param_names"]])
    p0 = [before[n].double() for n in ref["param_names"]]
    floor = torch.stack([torch.stack([ulp * p.abs().sum(), 2 * (u[1] * ((ulp * p) ** 2).sum()).sqrt(),
                                      ulp * p.abs().max(), ulp * p.abs().sum()]) for p, u in zip(p0, updates)])
    ref_updates = ref["update_stats"]
    assert ((updates - ref_updates).abs() <= 1e-3 * scale_of(ref_updates) + floor).all()
    for key, value in ref["params_after"].items():
        assert_close_to_max(params[key].detach(), value, 1e-5, key)


# --------------------------------------------------------------------------- item 7: the CutMix box


def test_unimatchs_cutmix_box_per_image_and_view():
    g = torch.Generator().manual_seed(0)
    size, n = 65, 400
    masks = [mixing.sample_mix_mask(n, size, size, mode="cutmix", prob=0.5, generator=g, gate="sample", box="unimatch")
             for _ in range(2)]
    for mask in masks:
        boxed = mask.flatten(1).any(1)
        assert 0.42 < boxed.float().mean() < 0.58  # one coin per image
        area = mask.flatten(1).sum(1)[boxed].double() / size ** 2
        # U(0.02, 0.4) of the area, less the int() of each side: nothing above 40%, some near both ends.
        assert area.max() <= 0.4 and area.min() < 0.03 and area.max() > 0.33
        for m in mask[boxed]:
            rows, cols = m.any(1).nonzero(), m.any(0).nonzero()
            h, w = len(rows), len(cols)
            assert int(m.sum()) == h * w  # one rectangle
            assert 0.25 < h / w < 1 / 0.25  # aspect ratio in (0.3, 1/0.3), up to the int() of each side
    # The two views draw independently: the coins and the boxes differ.
    assert not torch.equal(masks[0].flatten(1).any(1), masks[1].flatten(1).any(1))
    # The half-area box stays the default.
    half = mixing.sample_mix_mask(8, size, size, mode="cutmix", prob=1.0, generator=g)
    assert (half.flatten(1).sum(1).double() / size ** 2 - 0.5).abs().max() < 0.03
    with pytest.raises(ConfigError, match="CutMix box"):
        mixing.sample_mix_mask(2, size, size, mode="cutmix", generator=g, box="square")


# --------------------------------------------------------------------------- items 4-5: the loaders


def test_release_exact_loaders_give_the_same_raw_images_and_their_padding(toy_root, toy_cfg, tmp_path):
    # Crops larger than the rescaled toy images, so every crop is padded on some side.
    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.method": "unimatch", "trainer.unimatch.release_exact": True,
                                         "net.encoder.kwargs.ceil_mode": False,
                                         "dataset.train.rand_resize": [0.5, 0.75]})
    assert loader_options(cfg) == {"strong_views": 2, "padding_mask": True}
    loaders = build_train_loaders(cfg, seed=cfg["seed"], **loader_options(cfg))
    partner = build_partner_loader(cfg, 0, 1)
    _, unlabeled = next(iter(epoch_batches(loaders.labeled, loaders.unlabeled, partner)))
    # Item 4: the mix batch is the unlabeled batch's images, in its order, augmented afresh.
    assert unlabeled["partner_id"] == unlabeled["id"]
    assert not torch.equal(unlabeled["partner_image"], unlabeled["image"])
    # Item 5: `padding` marks exactly the padded border (normalised 0 in every channel).
    for image, padding in ((unlabeled["image"], unlabeled["padding"]), (unlabeled["partner_image"], unlabeled["partner_padding"])):
        assert padding.dtype == torch.bool and padding.any() and not padding.all()
        assert (image.abs().sum(1)[padding] == 0).all() and (image.abs().sum(1)[~padding] > 0).all()
    # The default keeps its reshuffled partner pass and no padding mask.
    default = toy_cfg(toy_root, tmp_path, **{"trainer.method": "unimatch"})
    assert loader_options(default) == {"strong_views": 2, "padding_mask": False}
    _, plain = next(iter(epoch_batches(*build_train_loaders(default, seed=0, **loader_options(default))[:2],
                                       build_partner_loader(default, 0, 1))))
    assert "padding" not in plain and plain["partner_id"] != plain["id"]


def test_release_exact_trains_on_the_toy_with_the_lr_set_after_the_step(toy_root, toy_cfg, tmp_path):
    from s4mc.distributed import DistInfo
    from s4mc.engine import loop

    lrs = {}
    for exact in (False, True):
        cfg = toy_cfg(toy_root, tmp_path, **{"trainer.method": "unimatch", "trainer.eval_on": False,
                                             "trainer.unimatch.release_exact": exact,
                                             "net.encoder.kwargs.ceil_mode": False if exact else None})
        loaders = build_train_loaders(cfg, seed=0, **loader_options(cfg))
        batches = epoch_batches(loaders.labeled, loaders.unlabeled, build_partner_loader(cfg, 0, 1))
        torch.manual_seed(0)
        state = loop.build_state(cfg, DistInfo(), iters_per_epoch=10)
        metrics = [train_step(state, [next(batches)], cfg) for _ in range(3)]
        assert all(torch.isfinite(m["loss"]) for m in metrics)
        assert ("mask_ratio" in metrics[0]) is exact
        lrs[exact] = [float(m["lr"]) for m in metrics]
    # Item 6: the default steps iteration k with lr(k); release-exact with lr(k - 1) (the first with lr(0)).
    assert lrs[True] == [lrs[False][0], lrs[False][0], lrs[False][1]]


# --------------------------------------------------------------------------- the configs


def test_release_exact_config_checks_and_header(toy_root, toy_cfg, tmp_path):
    opts = {"trainer.method": "unimatch", "trainer.unimatch.release_exact": True}
    with pytest.raises(ConfigError, match="net.encoder.kwargs.ceil_mode.*ceil_mode: false"):
        toy_cfg(toy_root, tmp_path, **opts)
    with pytest.raises(ConfigError, match="trainer.unimatch.ema.*no EMA teacher"):
        toy_cfg(toy_root, tmp_path, **opts, **{"net.encoder.kwargs.ceil_mode": False, "trainer.unimatch.ema": True})
    cfg = toy_cfg(toy_root, tmp_path, **opts, **{"net.encoder.kwargs.ceil_mode": False})
    assert describe_method(cfg).startswith("UniMatch release-exact")
    assert not describe_method(toy_cfg(toy_root, tmp_path, **{"trainer.method": "unimatch"})).startswith(
        "UniMatch release-exact")
    with pytest.raises(ConfigError, match="net.decoder.kwargs.*no representation head"):
        build_model({**net_config(), "decoder": {"type": "deeplabv3_plus_unimatch", "kwargs": {"rep_head": True}}})


def test_pascal_unimatch_366_loads_a_unimatch_checkpoint_strictly(tmp_path, one_thread):
    cfg = load_config(REPO / "experiments" / "pascal_unimatch" / "366" / "config.yaml",
                      ["net.encoder.pretrained=null"])
    assert cfg["trainer"]["unimatch"]["release_exact"] and cfg["net"]["decoder"]["type"] == "deeplabv3_plus_unimatch"
    model = build_model(cfg["net"])
    header = build_run_header(cfg, world_size=4, optimizer=build_optimizer(model, cfg, 4), iters_per_epoch=1,
                              labeled_images=None, unlabeled_images=None, val_images=None, amp_dtype=None,
                              channels_last=False)
    assert "UniMatch release-exact" in format_run_header(header)
    # As UniMatch saves it (unimatch.py): the DDP-wrapped model's state dict under "model".
    theirs = {f"module.{k}": torch.full_like(v, i % 7) for i, (k, v) in enumerate(to_unimatch_layout(model.state_dict()).items())}
    torch.save({"model": theirs, "epoch": 79, "previous_best": 77.5}, tmp_path / "best.pth")
    fresh = build_model(cfg["net"])
    info = load_checkpoint(fresh, tmp_path / "best.pth")
    assert info["epoch"] == 79 and info["best_miou"] == 77.5
    for k, v in to_unimatch_layout(fresh.state_dict()).items():
        assert torch.equal(v, theirs[f"module.{k}"]), k
    # A missing key still fails, naming it.
    del theirs["module.head.b4.gap.1.weight"]
    torch.save({"model": theirs}, tmp_path / "broken.pth")
    with pytest.raises(Exception, match="decoder.head.b4.gap.1.weight"):
        load_checkpoint(fresh, tmp_path / "broken.pth")


def test_unimatch_split_fetch_refuses_unverified_lists_unless_told(tmp_path):
    from s4mc.data.splits import UNIMATCH_COMMIT, fetch_unimatch_splits
    from s4mc.errors import DataError

    served = {}

    def fetcher(url):
        served[url] = True
        if "cityscapes" in url:
            return b"leftImg8bit/train/a/x_leftImg8bit.png gtFine/train/a/x_gtFine_labelTrainIds.png\n"
        return b"JPEGImages/2008_004112.jpg SegmentationClass/2008_004112.png\nJPEGImages/2010_005028.jpg SegmentationClass/2010_005028.png\n"

    with pytest.raises(DataError, match="no known checksums.*--unverified"):
        fetch_unimatch_splits(tmp_path, only=["pascal/366"], fetcher=fetcher)
    assert not served and not any(tmp_path.iterdir())
    files = fetch_unimatch_splits(tmp_path, only=["pascal/662", "cityscapes/186/labeled.txt"], unverified=True,
                                  fetcher=fetcher)
    assert sorted(str(f.relative_to(tmp_path)) for f in files) == [
        "cityscapes/186/labeled.txt", "pascal/662/labeled.txt", "pascal/662/unlabeled.txt"]
    # UniMatch names the blended protocols by fraction, at the pinned commit.
    assert f"https://raw.githubusercontent.com/LiheYoung/UniMatch/{UNIMATCH_COMMIT}/splits/pascal/1_16/labeled.txt" in served
    assert (tmp_path / "pascal/662/labeled.txt").read_text() == "2008_004112\n2010_005028\n"
    assert (tmp_path / "cityscapes/186/labeled.txt").read_text() == "leftImg8bit/train/a/x_leftImg8bit.png\n"
    assert len((tmp_path / "SHA256SUMS.unverified").read_text().splitlines()) == 3
