"""Measure the toy's labeled/unlabeled shift with trained models (docs/method.md, "The toy study").

    python benchmarks/toy_shift.py RUN_DIR [RUN_DIR ...] [--json shift.json]

The toy's labeled images are drawn under clean conditions and its unlabeled and validation images
under noisier, blurrier, unevenly lit ones (s4mc/data/toy.py, LABELED and TARGET). Self-training has
something to teach only if that shift costs the supervised model accuracy on the unlabeled pool.
This script evaluates each run's final checkpoint (the weights its own evaluation used) on:

  unlabeled pool   the training images outside the labeled split (their labels are never trained on)
  val              the validation images, as the study scores them
  val, clean       the same validation scenes redrawn under the labeled split's conditions

so "val, clean" minus "val" is what the shift costs a model, and a semi-supervised run should
recover part of it. Runs come from benchmarks/variants.py (--out DIR) or train_semi.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from s4mc.data.toy import LABELED, generate_toy  # noqa: E402


def evaluate(run: Path, root: Path, split: str, out: Path) -> dict:
    cmd = [sys.executable, str(REPO / "eval.py"), "--config", str(run / "config.yaml"), "--device", "cpu",
           "--checkpoint", str(run / "checkpoints" / "latest.pth"), "--json", str(out),
           "--opts", f"dataset.val.data_root={root}", f"dataset.val.data_list={root / 'splits' / split}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"eval.py failed on {run} ({split}):\n{done.stderr[-2000:]}")
    result = json.loads(out.read_text())
    return {"miou": round(100 * result["miou"], 2), "pixel_acc": round(100 * result["pixel_acc"], 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (config.yaml, checkpoints/latest.pth)")
    ap.add_argument("--data-root", type=Path, default=REPO / "data" / "toy", help="the toy dataset the runs used")
    ap.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)
    info_path = args.data_root / "toy.json"
    if not info_path.is_file():
        raise SystemExit(f"{info_path} not found: --data-root must be a toy dataset written by s4mc.data.toy")
    info = json.loads(info_path.read_text())
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Same seed and sizes, so the same scenes; every image drawn under the labeled split's conditions.
        clean = generate_toy(tmp / "toy_clean", seed=info["seed"], num_train=info["num_train"],
                             num_labeled=info["num_labeled"], num_val=info["num_val"], size=info["size"],
                             style=LABELED, labeled_style=None)
        for run in args.runs:
            row = {}
            for key, root, split in (("unlabeled_pool", args.data_root, "unlabeled.txt"),
                                     ("val", args.data_root, "val.txt"), ("val_clean", clean, "val.txt")):
                row[key] = evaluate(run, root, split, tmp / f"{run.name}_{key}.json")
            results[run.name] = row
            print(f"{run.name:24s} unlabeled pool {row['unlabeled_pool']['miou']:6.2f} mIoU "
                  f"({row['unlabeled_pool']['pixel_acc']:5.2f}% px) | val {row['val']['miou']:6.2f} "
                  f"({row['val']['pixel_acc']:5.2f}%) | val, clean {row['val_clean']['miou']:6.2f} "
                  f"({row['val_clean']['pixel_acc']:5.2f}%)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
