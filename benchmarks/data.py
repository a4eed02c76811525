"""Training-pipeline throughput per worker process (images/s), crop 513, VOC-sized JPEGs.

    python benchmarks/data.py [--images 24] [--runs 5] [--crop 513]
    python benchmarks/data.py --images 2 --runs 1 --crop 64     # smoke test: checks it runs

Generates 500x375 JPEGs (smooth colour fields with shapes, so the decoder does
realistic work) and index masks in a temporary VOC layout, then times a single
process iterating the training dataset (decode + rescale [0.5, 2] + crop + flip +
normalise), with and without the photometric strong view. One DataLoader worker
runs exactly this loop, so multiply by dataset.workers for the loader's ceiling.
Reports the median over several runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from s4mc.data.datasets import SegmentationDataset, build_samples  # noqa: E402
from s4mc.data.transforms import StrongPhotometric, TrainTransform  # noqa: E402


def make_voc_like(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    ids = []
    for i in range(n):
        h, w = 375, 500
        small = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        lab = np.zeros((h, w), np.uint8)
        for _ in range(3):
            cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(30, 120)
            c = int(rng.integers(1, 21))
            cv2.circle(img, (int(cx), int(cy)), int(r), tuple(int(v) for v in rng.integers(0, 256, 3)), -1)
            cv2.circle(lab, (int(cx), int(cy)), int(r), c, -1)
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        sid = f"2008_{i:06d}"
        cv2.imwrite(str(root / "JPEGImages" / f"{sid}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        Image.fromarray(lab).save(root / "SegmentationClassAug" / f"{sid}.png")
        ids.append(sid)
    (root / "train.txt").write_text("\n".join(ids) + "\n")


def time_pass(ds, order) -> float:
    t0 = time.perf_counter()
    for i in order:
        ds[i]
    return len(order) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24, help="distinct JPEGs to generate")
    ap.add_argument("--runs", type=int, default=5, help="timed passes (median reported)")
    ap.add_argument("--crop", type=int, default=513)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)   # a DataLoader worker runs single-threaded
    cv2.setNumThreads(0)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_voc_like(root, a.images)
        samples = build_samples("pascal", root, root / "train.txt", require_masks=True)
        results = {}
        for name, strong in (("weak (labeled / unlabeled)", None),
                             ("weak + strong view (S4MC psi unlabeled)", StrongPhotometric())):
            tf = TrainTransform(crop_size=(a.crop, a.crop), scale_range=(0.5, 2.0), flip=True, strong=strong)
            ds = SegmentationDataset(samples, num_classes=21, transform=tf)
            order = list(range(len(ds)))
            time_pass(ds, order[:4])  # warm-up: imports, allocator, page cache
            rates = [time_pass(ds, order) for _ in range(a.runs)]
            results[name] = (statistics.median(rates), min(rates), max(rates))
        decode = SegmentationDataset(samples, num_classes=21, transform=None)
        dec = statistics.median(time_pass(decode, list(range(len(decode)))) for _ in range(a.runs))
    print(f"data pipeline, one process, 500x375 JPEG -> crop {a.crop}, {a.images} images x {a.runs} runs "
          f"(torch {torch.__version__}, cv2 {cv2.__version__}, {os.cpu_count()} CPUs visible)")
    print(f"  decode + checks only                     : {dec:7.1f} img/s")
    for name, (med, lo, hi) in results.items():
        print(f"  {name:41s}: {med:7.1f} img/s (median; range {lo:.1f}-{hi:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
