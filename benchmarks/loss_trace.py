r"""A fixed-seed, 20-iteration loss trace of the real training loop, for refactors.

    OMP_NUM_THREADS=1 python benchmarks/loss_trace.py > /tmp/after.txt
    diff benchmarks/loss_trace_before.txt /tmp/after.txt     # empty: behaviour unchanged

Each setting trains a tiny model on a tiny generated toy set through `s4mc.engine.loop.train`
(so batches, partner loader, step, EMA and checkpoints are all on the path) with every
iteration logged, and prints every logged value with `repr` precision plus a digest of the
final student and teacher weights. Deterministic on one CPU thread; compare outputs made on
the same machine and torch version only.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from s4mc.config import load_config  # noqa: E402

ITERATIONS = 20

# name -> dotted overrides on top of `base_config`; each exercises one branch of the step.
SETTINGS: dict[str, dict] = {
    "sup": {"trainer.mode": "sup"},
    "warmup": {"trainer.sup_only_epoch": 1},
    "cutmix_no_refine": {"trainer.unsupervised.refine": False},
    "s4mc": {},
    "s4mc_confidence_k2": {"trainer.unsupervised.indicator": "confidence", "trainer.unsupervised.num_neighbors": 2},
    "s4mc_entropy_4nbr": {"trainer.unsupervised.indicator": "entropy", "trainer.unsupervised.neighborhood_size": 4},
    "s4mc_psi": {"trainer.unsupervised.mix_gate": "sample"},
    "s4mc_classmix": {"trainer.unsupervised.mixing": "classmix"},
    "s4mc_cutout": {"trainer.unsupervised.mixing": "cutout"},
    "s4mc_no_mix": {"trainer.unsupervised.mixing": "none"},
    "s4mc_strong_aug": {"trainer.unsupervised.strong_aug": True, "dataset.train.strong_aug": {}},
    "s4mc_iteration_schedule": {"trainer.unsupervised.keep_schedule": "iteration"},
    "contrastive": {"trainer.contrastive": {}},
    "batch1_partner": {"dataset.batch_size": 1, "trainer.sup_only_epoch": 0, "net.sync_bn": False},
    "amp_off_explicit": {"trainer.amp": "off"},
}


def base_config(root: Path, out: Path, overrides: dict, iterations: int = ITERATIONS) -> dict:
    data = {
        "seed": 3,
        "output_dir": str(out),
        "dataset": {
            "type": "toy", "batch_size": 2, "workers": 0,
            "train": {"data_root": str(root), "data_list": str(root / "splits" / "labeled.txt"),
                      "rand_resize": [0.75, 1.25], "crop": {"type": "rand", "size": [40, 40]}},
            "val": {"data_root": str(root), "data_list": str(root / "splits" / "val.txt")},
        },
        "trainer": {
            "epochs": 6, "sup_only_epoch": 0, "log_every": 1, "eval_on": False, "deterministic": True,
            "max_iters": iterations, "optimizer": {"kwargs": {"lr": 0.01}},
            "unsupervised": {"neighborhood_size": 8, "neighbor_prior": "none"},
        },
        "net": {
            "num_classes": 6, "sync_bn": False,
            "encoder": {"type": "resnet_tiny", "kwargs": {"width": 8}},
            "decoder": {"kwargs": {"inner_planes": 16, "low_conv_planes": 16, "dilations": [2, 4, 6]}},
        },
    }
    opts = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    return load_config(None, opts, data=data)


def digest(state_dict: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        if torch.is_tensor(value):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def trace(name: str, overrides: dict, root: Path, work: Path, iterations: int = ITERATIONS) -> list[str]:
    from s4mc.engine.loop import train

    cfg = base_config(root, work / name, overrides, iterations)
    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg, name="run", device="cpu", argv=["loss_trace", name])
    run = work / name / "run"
    lines = []
    for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        values = " ".join(f"{k}={record[k]!r}" for k in sorted(record) if k not in ("kind", "iteration", "epoch", "images_per_s"))
        lines.append(f"{name} it={record['iteration']} {values}")
    ckpt = torch.load(run / "checkpoints" / "latest.pth", map_location="cpu", weights_only=False)
    lines.append(f"{name} student={digest(ckpt['model_state'])} teacher={digest(ckpt['teacher_state'])}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--iters", type=int, default=ITERATIONS,
                        help="iterations per setting (default %(default)s, as loss_trace_before.txt was made)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.INFO)
    from s4mc.data.toy import generate_toy

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "toy"
        generate_toy(root, seed=0, num_train=24, num_labeled=8, num_val=5, size=48)
        for name in args.settings:
            for line in trace(name, SETTINGS[name], root, Path(tmp) / "runs", args.iters):
                print(line, flush=True)


if __name__ == "__main__":
    main()
