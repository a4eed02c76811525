"""Shared test set-up: `gpu`-marked tests skip on machines without CUDA."""

import json
import socket
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on a GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    """A free TCP port on the loopback, for a test's torchrun / gloo rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """A tiny generated toy dataset: 24 training images (8 labeled), 5 val, 48 px."""
    from s4mc.data.toy import generate_toy

    root = tmp_path_factory.mktemp("toy") / "toy"
    generate_toy(root, seed=0, num_train=24, num_labeled=8, num_val=5, size=48)
    return root


def make_toy_cfg(root: Path, out: Path, **overrides) -> dict:
    from s4mc.config import load_config

    data = {
        "seed": 0,
        "output_dir": str(out),
        "dataset": {
            "type": "toy",
            "batch_size": 2,
            "workers": 0,
            "train": {
                "data_root": str(root),
                "data_list": str(root / "splits" / "labeled.txt"),
                "rand_resize": [0.75, 1.25],
                "crop": {"type": "rand", "size": [40, 40]},
            },
            "val": {"data_root": str(root), "data_list": str(root / "splits" / "val.txt")},
        },
        "trainer": {
            "epochs": 2,
            "sup_only_epoch": 0,
            "log_every": 2,
            "deterministic": True,
            "optimizer": {"kwargs": {"lr": 0.01}},
            "unsupervised": {"neighborhood_size": 8, "neighbor_prior": "none"},
        },
        "net": {
            "num_classes": 6,
            "sync_bn": False,
            "encoder": {"type": "resnet_tiny", "kwargs": {"width": 8}},
            "decoder": {"kwargs": {"inner_planes": 16, "low_conv_planes": 16, "dilations": [2, 4, 6]}},
        },
    }
    opts = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    return load_config(None, opts, data=data)




@pytest.fixture
def toy_cfg():
    """Build a validated config for the tiny toy data; keyword overrides are dotted keys."""
    return make_toy_cfg


@pytest.fixture(params=["cpu-selection", "device-sort"])
def percentile_path(request, monkeypatch):
    """Run a percentile test through both implementations of s4mc.percentile: selection
    (the CPU's) and the sync-free sort that CUDA takes, which runs on the CPU as well."""
    from s4mc import percentile

    if request.param == "device-sort":
        monkeypatch.setattr(percentile, "_order_statistics_cpu", percentile._order_statistics)
    return request.param
