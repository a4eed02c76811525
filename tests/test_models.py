"""Models: U2PL checkpoint layout (keys, shapes, parameter counts), outputs, strict weight loading."""

from __future__ import annotations

import argparse
import json
import logging
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from s4mc.engine.checkpoint import load_training_checkpoint
from s4mc.errors import CheckpointError, ConfigError
from s4mc.models import (
    build_model,
    load_backbone,
    load_checkpoint,
    maybe_sync_bn,
    resnet50,
    resnet101,
)

# Every state-dict key and shape of the release's models; provenance in tests/data/README.md.
REFERENCE = Path(__file__).resolve().parent / "data" / "u2pl_model_state_dict.json"

VARIANTS = {
    "resnet101_voc21": dict(num_classes=21, encoder=dict(type="resnet101")),
    "resnet101_cityscapes19_aux": dict(
        num_classes=19,
        encoder=dict(type="u2pl.models.resnet.resnet101"),
        decoder=dict(type="u2pl.models.decoder.dec_deeplabv3_plus"),
        aux_loss=dict(aux_plane=1024, loss_weight=0.4),
    ),
    "resnet50_voc21": dict(num_classes=21, encoder=dict(type="u2pl.models.resnet.resnet50")),
}
# Facts measured from the release (also in the reference file).
PARAMS = {"resnet101_voc21": 64_459_989, "resnet101_cityscapes19_aux": 66_824_422, "resnet50_voc21": 45_467_861}

TINY = dict(
    num_classes=5,
    encoder=dict(type="resnet_tiny", kwargs=dict(width=16)),
    decoder=dict(kwargs=dict(inner_planes=32, low_conv_planes=32)),
)


@pytest.fixture(scope="module")
def reference():
    return json.loads(REFERENCE.read_text())


_BUILT: dict[str, nn.Module] = {}


def big_model(name: str) -> nn.Module:
    # Building a ResNet-101 costs ~1 s; build each variant once per test session.
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = build_model(VARIANTS[name]).eval()
    return _BUILT[name]


def tiny_model(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return build_model({**TINY, **overrides})


def outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model(x)


# ----------------------------------------------------------------- layout vs the release


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_count(name):
    assert sum(p.numel() for p in big_model(name).parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_state_dict_keys_and_shapes_match_reference(name, reference):
    ref = reference[name]
    got = {k: list(v.shape) for k, v in big_model(name).state_dict().items()}
    assert set(got) == set(ref["state_dict"]), (
        sorted(set(ref["state_dict"]) - set(got))[:10],
        sorted(set(got) - set(ref["state_dict"]))[:10],
    )
    assert got == ref["state_dict"]
    assert ref["params"] == PARAMS[name]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_output_shapes_at_65(name, reference):
    out = outputs(big_model(name), torch.randn(1, 3, 65, 65))
    expected = reference[name]["outputs_at_65x65"]
    assert {k: list(v.shape) for k, v in out.items()} == expected


def test_encoder_matches_imagenet_backbone_keys(reference):
    enc = big_model("resnet101_voc21").encoder
    got = {k: list(v.shape) for k, v in enc.state_dict().items()}
    assert got == reference["resnet101_imagenet_backbone_keys"]


def test_dilations_output_stride_8_and_16():
    enc = resnet101()
    assert [b.conv2.dilation[0] for b in enc.layer4] == [4, 8, 16]
    assert enc.layer3[0].conv2.dilation[0] == 1
    assert {b.conv2.dilation[0] for b in enc.layer3[1:]} == {2}
    assert all(b.conv2.stride == (1, 1) for b in list(enc.layer3) + list(enc.layer4))
    assert enc.layer2[0].conv2.stride == (2, 2) and enc.layer2[0].conv1.stride == (1, 1)
    assert enc.maxpool.ceil_mode
    # OS16: layer3 keeps its stride, layer4 dilated with multi-grid.
    enc16 = resnet50(replace_stride_with_dilation=[False, False, True]).eval()
    assert enc16.output_stride == 16
    assert [b.conv2.dilation[0] for b in enc16.layer4] == [2, 4, 8]
    with torch.no_grad():
        feats = enc16(torch.randn(1, 3, 65, 65))
    # 65 -> 33 (stem) -> 17 (ceil-mode pool) = layer1; then /2, /2, and layer4 dilated.
    assert [f.shape[-1] for f in feats] == [17, 9, 5, 5]


def test_zero_init_residual():
    enc = resnet50(zero_init_residual=True)
    assert all(float(b.bn3.weight.detach().abs().sum()) == 0 for layer in (enc.layer1, enc.layer4) for b in layer)
    assert float(resnet50(zero_init_residual=False).layer1[0].bn3.weight.detach().sum()) > 0


# ----------------------------------------------------------------- tiny model, dtypes, layouts


def test_tiny_forward_shapes_and_channels_from_encoder():
    model = tiny_model(aux_loss=dict(aux_plane=1024))  # stale release aux_plane is ignored
    assert model.encoder.out_channels == (64, 128, 256, 512)
    out = outputs(model, torch.randn(2, 3, 96, 96))
    # 96 -> 48 (stem) -> 25 (ceil-mode pool, as in the release) -> 13 at layer2..4.
    assert out["pred"].shape == (2, 5, 25, 25)
    assert out["rep"].shape == (2, 32, 25, 25)
    assert out["aux"].shape == (2, 5, 13, 13)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_rep_head_off():
    model = tiny_model(decoder=dict(kwargs=dict(inner_planes=32, low_conv_planes=32, rep_head=False)))
    out = outputs(model, torch.randn(1, 3, 65, 65))
    assert set(out) == {"pred"}
    assert not any(k.startswith("decoder.representation") for k in model.state_dict())


def test_train_step_channels_last_and_bf16_autocast():
    model = tiny_model().to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 3, 96, 96).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out["pred"].dtype == torch.bfloat16 and out["pred"].shape == (2, 5, 25, 25)
    (out["pred"].float().mean() + out["rep"].float().mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # channels_last must not change the numbers (eval, fp32).
    ref = outputs(model.to(memory_format=torch.contiguous_format), x.contiguous())["pred"]
    cl = outputs(model.to(memory_format=torch.channels_last), x)["pred"]
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------- registry


def test_release_type_strings_map_to_builders():
    model = build_model(
        dict(
            num_classes=3,
            encoder=dict(type="some.fork.resnet_tiny", kwargs=dict(width=8, multi_grid=True, fpn=True)),
            decoder=dict(type="u2pl.models.decoder.dec_deeplabv3_plus", kwargs=dict(inner_planes=16, low_conv_planes=16)),
        )
    )
    assert model.encoder.out_channels[-1] == 256


def test_unknown_type_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        build_model(dict(num_classes=3, encoder=dict(type="u2pl.models.resnet.resnet102")))
    msg = str(e.value)
    assert "net.encoder.type" in msg and "resnet101" in msg and "resnet_tiny" in msg and "did you mean" in msg
    with pytest.raises(ConfigError, match="net.decoder.type.*deeplabv3_plus"):
        build_model(dict(num_classes=3, encoder=dict(type="resnet_tiny"), decoder=dict(type="pspnet")))


def test_unknown_kwarg_and_missing_num_classes_are_config_errors():
    with pytest.raises(ConfigError, match=r"net.encoder.kwargs.*bogus"):
        build_model(dict(num_classes=3, encoder=dict(type="resnet_tiny", kwargs=dict(bogus=1))))
    with pytest.raises(ConfigError, match="net.num_classes"):
        build_model(dict(encoder=dict(type="resnet_tiny")))


# ----------------------------------------------------------------- backbone loading


def test_backbone_round_trip_with_fc_keys(tmp_path):
    src = tiny_model(seed=1)
    with torch.no_grad():  # make BN running stats non-trivial so they are checked too
        for m in src.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    sd = dict(src.encoder.state_dict())
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)  # ImageNet head: ignored
    path = tmp_path / "resnet_tiny.pth"
    torch.save(sd, path)

    dst = tiny_model(seed=2)
    load_backbone(dst, path)
    x = torch.randn(1, 3, 65, 65)
    src.eval(), dst.eval()
    with torch.no_grad():
        for a, b in zip(src.encoder(x), dst.encoder(x)):
            assert torch.equal(a, b)

    # build_model loads it through encoder.pretrained as well.
    cfg = {**TINY, "encoder": {**TINY["encoder"], "pretrained": str(path)}}
    built = build_model(cfg)
    assert torch.equal(built.encoder.layer4[0].conv2.weight, src.encoder.layer4[0].conv2.weight)


def test_backbone_errors_name_keys_and_file(tmp_path):
    sd = tiny_model().encoder.state_dict()
    bad = dict(sd)
    bad["layer2.0.conv2.weight"] = torch.zeros(3, 3, 3, 3)
    del bad["layer3.0.bn1.running_var"]
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(CheckpointError) as e:
        load_backbone(tiny_model(), path)
    msg = str(e.value)
    assert str(path) in msg and "layer2.0.conv2.weight" in msg and "[3, 3, 3, 3]" in msg
    assert "layer3.0.bn1.running_var" in msg and "missing" in msg

    with pytest.raises(CheckpointError, match="U2PL") as e:
        load_backbone(tiny_model(), tmp_path / "resnet101.pth")
    assert "resnet101.pth" in str(e.value)


def test_torchvision_stem_loads_torchvision_resnet50_exactly(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.models.resnet50().eval()
    path = tmp_path / "tv_r50.pth"
    torch.save(tv.state_dict(), path)  # includes fc.*
    # Without dilation/multi-grid, our encoder must compute exactly torchvision's features.
    enc = resnet50(stem="torchvision", replace_stride_with_dilation=[False, False, False], multi_grid=False).eval()
    load_backbone(enc, path)
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        ref = nn.Sequential(*list(tv.children())[:-2])(x)
        assert torch.equal(enc(x)[-1], ref)
    # A deep-stem model refuses the 7x7 file and says which setting to change.
    with pytest.raises(CheckpointError, match="stem: torchvision"):
        load_backbone(resnet50(), path)


def test_pretrained_torchvision_by_name(monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models._api import WeightsEnum

    tv_sd = torchvision.models.resnet50().state_dict()
    seen = {}

    def fake_get_state_dict(self, *args, **kwargs):
        seen.update(kwargs, url=self.url)
        return tv_sd

    monkeypatch.setattr(WeightsEnum, "get_state_dict", fake_get_state_dict)
    model = build_model(dict(num_classes=2, encoder=dict(type="resnet50", stem="torchvision", pretrained="torchvision")))
    assert seen["weights_only"] is True and seen["url"].endswith(".pth")
    assert torch.equal(model.encoder.conv1.weight, tv_sd["conv1.weight"])

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(CheckpointError) as e:
        load_backbone(resnet50(stem="torchvision"), "torchvision")
    msg = str(e.value)
    assert "https://download.pytorch.org/models/resnet50" in msg and "hub" in msg and "checkpoints" in msg
    with pytest.raises(CheckpointError, match="stem: torchvision"):
        load_backbone(resnet50(), "torchvision")


# ----------------------------------------------------------------- checkpoint loading


def _prefixed(sd):
    return {f"module.{k}": v for k, v in sd.items()}


def test_checkpoint_round_trip_module_prefix_teacher_and_student(tmp_path):
    student, teacher = tiny_model(seed=1), tiny_model(seed=2)
    path = tmp_path / "ckpt_best.pth"
    torch.save(
        {
            "epoch": 7,
            "best_miou": 0.5,
            "model_state": _prefixed(student.state_dict()),
            "teacher_state": _prefixed(teacher.state_dict()),
            "optimizer_state": {"state": {}, "param_groups": []},
        },
        path,
    )
    x = torch.randn(1, 3, 65, 65)
    fresh = tiny_model(seed=3)
    info = load_checkpoint(fresh, path)  # default: teacher
    assert info["state_key"] == "teacher_state" and info["epoch"] == 7 and info["best_miou"] == 0.5
    for k, v in outputs(teacher, x).items():
        assert torch.equal(outputs(fresh, x)[k], v)
    assert load_checkpoint(fresh, path, which="student")["state_key"] == "model_state"
    assert torch.equal(outputs(fresh, x)["pred"], outputs(student, x)["pred"])

    # Supervised-only checkpoints have no teacher_state: fall back to model_state.
    torch.save({"model_state": student.state_dict(), "epoch": 1}, tmp_path / "sup.pth")
    assert load_checkpoint(tiny_model(), tmp_path / "sup.pth")["state_key"] == "model_state"
    # A bare (prefixed) state dict.
    torch.save(_prefixed(teacher.state_dict()), tmp_path / "bare.pth")
    fresh = tiny_model(seed=4)
    assert load_checkpoint(fresh, tmp_path / "bare.pth")["state_key"] is None
    assert torch.equal(outputs(fresh, x)["rep"], outputs(teacher, x)["rep"])


def test_checkpoint_errors(tmp_path):
    model = tiny_model()
    sd = dict(model.state_dict())
    sd["decoder.classifier.8.weight"] = torch.zeros(21, 32, 1, 1)  # VOC head into a 5-class model
    path = tmp_path / "wrong.pth"
    torch.save({"teacher_state": sd}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(model, path)
    msg = str(e.value)
    assert str(path) in msg and "decoder.classifier.8.weight" in msg and "[21, 32, 1, 1]" in msg and "[5, 32, 1, 1]" in msg

    sd = dict(model.state_dict())
    del sd["encoder.layer1.0.conv1.weight"]
    sd["auxor.aux.0.weight"] = torch.zeros(1)
    torch.save({"model_state": sd}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(model, path, which="student")
    msg = str(e.value)
    assert "encoder.layer1.0.conv1.weight" in msg and "auxor.aux.0.weight" in msg and "aux_loss" in msg

    with pytest.raises(CheckpointError, match="not found.*nope.pth"):
        load_checkpoint(model, tmp_path / "nope.pth")


def test_release_checkpoint_with_numpy_scalars_loads(tmp_path):
    """U2PL/S4MC checkpoints store best_miou as numpy.float64; a weights-only load must still take
    them, whether the file was pickled under numpy 2 (numpy._core) or numpy 1 (numpy.core)."""
    teacher = tiny_model(seed=5)
    ckpt = {"epoch": np.int64(40), "best_miou": np.float64(0.7312), "optimizer_state": {},
            "model_state": _prefixed(teacher.state_dict()), "teacher_state": _prefixed(teacher.state_dict())}
    x = torch.randn(1, 3, 65, 65)
    new_style, old_style = tmp_path / "numpy2.pth", tmp_path / "numpy1.pth"
    torch.save(ckpt, new_style)
    # The legacy (non-zip) format keeps the pickle as plain bytes, so numpy 1's module name can be
    # written in; the pickle's GLOBAL opcode is newline-terminated, so the length may change.
    torch.save(ckpt, old_style, _use_new_zipfile_serialization=False)
    old_style.write_bytes(old_style.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert b"numpy.core.multiarray" in old_style.read_bytes()
    for path in (new_style, old_style):
        fresh = tiny_model(seed=6)
        info = load_checkpoint(fresh, path)
        assert info["best_miou"] == pytest.approx(0.7312) and type(info["best_miou"]) is float
        assert info["epoch"] == 40 and type(info["epoch"]) is int
        assert torch.equal(outputs(fresh, x)["pred"], outputs(teacher, x)["pred"])


class RunsACommand:
    """Pickles as a call of os.system: what a malicious checkpoint holds (never unpickled here)."""

    def __reduce__(self):
        return (os.system, ("true",))


def test_unreadable_checkpoints_are_named_and_explained(tmp_path, monkeypatch):
    model = tiny_model()
    good = tmp_path / "good.pth"
    torch.save({"teacher_state": model.state_dict()}, good)
    garbage, truncated, foreign = tmp_path / "garbage.pth", tmp_path / "truncated.pth", tmp_path / "foreign.pth"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    truncated.write_bytes(good.read_bytes()[:200])
    torch.save({"teacher_state": model.state_dict(), "args": argparse.Namespace(lr=0.01)}, foreign)
    for path in (garbage, truncated):
        for load in (lambda p: load_checkpoint(model, p), load_training_checkpoint):
            with pytest.raises(CheckpointError) as e:
                load(path)
            msg = str(e.value)
            assert str(path) in msg and "damaged or truncated" in msg
            assert "weights_only` set to `False` will likely succeed" not in msg  # torch's advice misleads here
    with pytest.raises(CheckpointError, match=r"foreign\.pth holds objects that weights-only loading refuses "
                       r"\(argparse\.Namespace\).*may be unsafe"):
        load_checkpoint(model, foreign)
    # A pickle that would run a shell command: torch names it as a blocked module's global.
    malicious = tmp_path / "malicious.pth"
    torch.save({"teacher_state": RunsACommand()}, malicious)
    for load in (lambda p: load_checkpoint(model, p), load_training_checkpoint):
        with pytest.raises(CheckpointError) as e:
            load(malicious)
        assert "weights-only loading refuses" in str(e.value) and "system" in str(e.value)
        assert "may be unsafe" in str(e.value) and "damaged or truncated" not in str(e.value)
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(torch, "load", denied)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(model, good)
        assert str(e.value) == f"cannot read {good}: Permission denied"
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"list\.pth is not a training checkpoint: it holds a list"):
        load_training_checkpoint(tmp_path / "list.pth")


# ----------------------------------------------------------------- SyncBatchNorm


def test_maybe_sync_bn(caplog):
    model = tiny_model()
    with caplog.at_level(logging.INFO, logger="s4mc"):
        same = maybe_sync_bn(model, enabled=True, distributed=True, device="cpu")
    assert same is model and not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert "keeping BatchNorm" in caplog.text
    assert maybe_sync_bn(model, enabled=False, distributed=True, device="cuda") is model
    # The conversion itself needs no GPU, so the CUDA+DDP branch can be checked here.
    converted = maybe_sync_bn(tiny_model(), enabled=True, distributed=True, device=torch.device("cuda", 0))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
