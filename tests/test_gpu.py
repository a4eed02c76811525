"""CUDA checks: a few training iterations and one evaluation pass, with AMP on and off."""

from __future__ import annotations

import json

import pytest
import torch

from s4mc.config import load_config
from s4mc.distributed import DistInfo
from s4mc.engine import loop
from s4mc.engine.step import train_step
from s4mc.evaluation import evaluate

pytestmark = pytest.mark.gpu


def tiny_cfg(amp: str, channels_last: bool) -> dict:
    data = {
        "dataset": {"type": "toy", "batch_size": 4,
                    "train": {"data_root": "/nonexistent", "data_list": "/nonexistent/labeled.txt"},
                    "val": {"data_root": "/nonexistent", "data_list": "/nonexistent/val.txt"}},
        "trainer": {"epochs": 2, "sup_only_epoch": 0, "amp": amp, "channels_last": channels_last,
                    "optimizer": {"kwargs": {"lr": 0.01}}, "unsupervised": {"neighborhood_size": 8}},
        "net": {"num_classes": 6, "encoder": {"type": "resnet_tiny", "kwargs": {"width": 16}},
                "decoder": {"kwargs": {"inner_planes": 32, "low_conv_planes": 32}}},
    }
    return load_config(None, [], data=data)


def batch(n, size, classes, g, device):
    image = torch.randn(n, 3, size, size, generator=g).to(device)
    coarse = torch.randint(0, classes, (n, 1, 4, 4), generator=g).float()
    label = torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")[:, 0].long().to(device)
    return {"image": image, "label": label}


@pytest.mark.parametrize("amp,channels_last", [("off", False), ("bf16", True), ("fp16", True)])
def test_training_steps_on_cuda(amp, channels_last):
    cfg = tiny_cfg(amp, channels_last)
    state = loop.build_state(cfg, DistInfo(device=torch.device("cuda")), iters_per_epoch=10)
    g = torch.Generator().manual_seed(0)
    before = [p.detach().clone() for p in state.student_module.parameters()]
    for _ in range(4):
        metrics = train_step(state, [(batch(4, 96, 6, g, "cuda"), batch(4, 96, 6, g, "cuda"))], cfg)
    torch.cuda.synchronize()
    assert torch.isfinite(metrics["loss"]) and 0 < float(metrics["kept_fraction"]) <= 1
    assert metrics["threshold"].dtype == torch.float64  # the percentile stays fp64 under autocast
    after = list(state.student_module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert int(state.first_nonfinite) == -1
    print(json.dumps({"amp": amp, "loss": float(metrics["loss"]), "kept": float(metrics["kept_fraction"])}))


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_evaluation_on_cuda_matches_cpu(amp_dtype):
    cfg = tiny_cfg("off", False)
    from s4mc.models import build_model

    model = build_model(cfg["net"]).eval()
    g = torch.Generator().manual_seed(3)
    items = [batch(1, 64 + 8 * i, 6, g, "cpu") for i in range(3)]
    loader = [dict(b, id=[f"img{i}"]) for i, b in enumerate(items)]
    cpu = evaluate(model, loader, num_classes=6, device="cpu")
    gpu = evaluate(model.cuda(), loader, num_classes=6, device="cuda", amp_dtype=amp_dtype, refine={"neighbors": 8})
    assert gpu.num_images == 3 and gpu.refined is not None
    # Same pixels counted; predictions agree up to TF32/bf16 rounding at near-ties.
    assert cpu.confusion.sum() == gpu.confusion.sum()
    assert abs(cpu.miou - gpu.miou) < (0.02 if amp_dtype is None else 0.05)
