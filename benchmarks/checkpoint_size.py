r"""Sizes of latest.pth and best.pth for a config's model (default: PASCAL VOC 366 with ResNet-50).

    python benchmarks/checkpoint_size.py
    python benchmarks/checkpoint_size.py --opts net.encoder.type=resnet101

Builds the run's state as training does (student, teacher, SGD with momentum buffers after one
step), writes both checkpoints the way the loop writes them, and prints their sizes and what
each top-level key of latest.pth takes. No data and no ImageNet weights are needed
(net.encoder.pretrained is set to null). A key's share is measured by saving it alone; the
shares add up to the file when no tensor is stored twice.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from s4mc.config import load_config  # noqa: E402
from s4mc.distributed import DistInfo  # noqa: E402
from s4mc.engine import checkpoint as ckpt_io  # noqa: E402
from s4mc.engine import loop  # noqa: E402

MB = 1e6


def serialized_size(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "experiments" / "pascal" / "366" / "config.yaml"))
    parser.add_argument("--opts", nargs="*", default=[])
    args = parser.parse_args(argv)
    cfg = load_config(args.config, ["net.encoder.type=resnet50", "net.encoder.pretrained=null", *args.opts])
    torch.manual_seed(0)
    state = loop.build_state(cfg, DistInfo(), iters_per_epoch=10)
    # One step with zero gradients gives every parameter its momentum buffer, as after training.
    for p in state.student_module.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    state.optimizer.step()
    state.semi_start = 0  # the semi-supervised phase: the teacher is the evaluated model
    payload = ckpt_io.make_checkpoint(state, epoch=0, epoch_done=True, config=cfg)
    best = ckpt_io.best_checkpoint(payload) if hasattr(ckpt_io, "best_checkpoint") else payload
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {}
        for name, obj in (("latest.pth", payload), ("best.pth", best)):
            torch.save(obj, Path(tmp) / name)
            sizes[name] = (Path(tmp) / name).stat().st_size
    print(f"{cfg['net']['encoder']['type']}, {cfg['net']['num_classes']} classes "
          f"({sum(p.numel() for p in state.student_module.parameters()) / 1e6:.1f} M parameters)")
    for name, size in sizes.items():
        print(f"{name:11s} {size / MB:8.1f} MB")
    print("latest.pth by key:")
    shares = {key: serialized_size(value) for key, value in payload.items()}
    for key, size in sorted(shares.items(), key=lambda kv: -kv[1]):
        if size >= 0.01 * MB:
            print(f"  {key:16s} {size / MB:8.1f} MB")
    print(f"  (the keys apart: {sum(shares.values()) / MB:.1f} MB; together: {sizes['latest.pth'] / MB:.1f} MB)")
    print(f"best.pth keys: {', '.join(best)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
