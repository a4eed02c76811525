"""How much does S4MC's refinement change the pseudo-label mask of a given teacher? (No training.)

    python benchmarks/refine_effect.py RUN_DIR [--images 96] [--keep 60 70 80 90]

Loads the run's final weights (teacher, or the student of a supervised run), predicts the toy's
unlabeled pool at the training crop's scale, and for each indicator x neighbourhood x keep-percent
reports, at the same threshold gamma (docs/method.md steps 5-7):

  kept      share of valid pixels kept, unrefined -> refined
  acc.      accuracy of the kept pseudo-labels against the (never trained on) ground truth
  in/out    pixels the refinement adds to / removes from the kept set, per 1,000 valid pixels
  same-share  accuracy of the unrefined mask with its threshold moved to keep the refined share, and
            the refined accuracy's lead over it: above 0, the refinement picks better pixels than
            a different keep-percent would

A second table says where the flips lie, for the same settings: the pixels the refinement adds and
drops, how often their pseudo-label is right, and how many lie within 2 px of a class change in the
ground truth ("true edge") or in the pseudo-label ("predicted edge"), against all valid pixels.

This is the paper's quantity/quality claim measured directly on one teacher, without the noise of a
training run: refinement is worth something only where it keeps more pixels at equal or better
accuracy. The toy study (benchmarks/variants.py) is where the training-time effect is measured.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from s4mc import pseudo_label  # noqa: E402
from s4mc.config import load_config  # noqa: E402
from s4mc.data import build_val_dataset  # noqa: E402
from s4mc.models import build_model, load_checkpoint  # noqa: E402
from s4mc.data.priors import resolve_prior  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="run folder (config.yaml, checkpoints/latest.pth)")
    ap.add_argument("--images", type=int, default=96, help="unlabeled images to use (default: %(default)s)")
    ap.add_argument("--keep", type=float, nargs="+", default=[60, 70, 80, 90],
                    help="keep-percents (the schedule runs 60 -> 100 over training)")
    ap.add_argument("--indicators", nargs="+", default=["margin", "confidence"], choices=pseudo_label.INDICATORS,
                    help="indicators to measure (default: %(default)s)")
    ap.add_argument("--k", type=int, nargs="+", default=[1],
                    help="neighbours folded in per class (trainer.unsupervised.num_neighbors; default: 1)")
    ap.add_argument("--prior", default="none",
                    help="neighbour prior E_c, as trainer.unsupervised.neighbor_prior takes it (default: none)")
    ap.add_argument("--at-logits", action="store_true",
                    help="a what-if, not the method: threshold and refine on the teacher's 1/4-resolution map "
                         "(labels downsampled) instead of the upsampled one, so neighbours are distinct cells")
    args = ap.parse_args(argv)
    cfg = load_config(str(args.run / "config.yaml"))
    root = Path(cfg["dataset"]["train"]["data_root"])
    cfg["dataset"]["val"]["data_root"] = str(root)
    cfg["dataset"]["val"]["data_list"] = str(root / "splits" / "unlabeled.txt")
    prior = resolve_prior(args.prior, cfg["net"]["num_classes"], cfg["dataset"]["type"])
    model = build_model(cfg["net"])
    load_checkpoint(model, str(args.run / "checkpoints" / "latest.pth"), which="auto")
    model.eval()
    data = build_val_dataset(cfg)
    crop = cfg["dataset"]["train"]["crop"]["size"][0]
    logits, labels = [], []
    with torch.no_grad():
        for i in range(min(args.images, len(data))):
            item = data[i]
            # The training crop sees objects at this scale: resize the whole image to the crop size.
            x = F.interpolate(item["image"][None], size=(crop, crop), mode="bilinear", align_corners=True)
            y = F.interpolate(item["label"][None, None].float(), size=(crop, crop), mode="nearest")[0, 0].long()
            out = model(x)
            out = out["pred"] if isinstance(out, dict) else out
            if args.at_logits:
                logits.append(out.float())
                labels.append(F.interpolate(y[None, None].float(), size=out.shape[-2:], mode="nearest")[0, 0].long())
                continue
            # As in training: upsample the 1/4-resolution logits to the crop before the softmax.
            logits.append(F.interpolate(out.float(), size=(crop, crop), mode="bilinear", align_corners=True))
            labels.append(y)
    logits, labels = torch.cat(logits), torch.stack(labels)
    pseudo = logits.argmax(1)
    flip_rows = []
    print(f"{args.run.name}: {len(labels)} unlabeled images at {tuple(labels.shape[-2:])}, prior {args.prior}; pseudo-label pixel accuracy "
          f"{100 * (pseudo == labels)[labels != 255].float().mean():.2f}%")
    print(f"{'indicator':10s} {'nbrs':>4s} {'k':>2s} {'keep%':>5s} | {'kept %':>15s} | {'acc. %':>15s} | {'in/out per 1k':>13s} | {'same-share acc.':>15s}")
    valid = float((pseudo != 255).sum())
    for indicator in args.indicators:
        for neighbors, k, keep in itertools.product((4, 8), args.k, args.keep):
            target, s = pseudo_label.pseudo_label_target(logits, pseudo, keep, indicator=indicator, neighbors=neighbors,
                                                   k=k, prior=prior, refine=True, ground_truth=labels)
            unrefined, _ = pseudo_label.pseudo_label_target(logits, pseudo, keep, indicator=indicator, prior=prior,
                                                      refine=False)
            flip_rows.append((f"{indicator:10s} {neighbors:4d} {k:2d} {keep:5.0f}", target != 255, unrefined != 255))
            same = float(s['kept_accuracy_same_share'])
            print(f"{indicator:10s} {neighbors:4d} {k:2d} {keep:5.0f} | "
                  f"{100 * float(s['kept_fraction_unrefined']):6.2f} -> {100 * float(s['kept_fraction']):6.2f} | "
                  f"{100 * float(s['kept_accuracy_unrefined']):6.2f} -> {100 * float(s['kept_accuracy']):6.2f} | "
                  f"{1000 * float(s['flipped_to_keep']) / valid:5.1f} / {1000 * float(s['flipped_to_drop']) / valid:5.1f} | "
                  f"{100 * same:6.2f} ({100 * (float(s['kept_accuracy']) - same):+5.2f})")
    print_flip_table(flip_rows, pseudo, labels)
    return 0


def near_edge(label_map, radius=2):
    """Pixels within `radius` px of a class change in `label_map` [N,H,W] (255 counts as a class)."""
    x = label_map[:, None].float()
    edge = F.max_pool2d(x, 3, 1, 1) != -F.max_pool2d(-x, 3, 1, 1)
    return F.max_pool2d(edge.float(), 2 * radius + 1, 1, radius)[:, 0] > 0


def print_flip_table(rows, pseudo, labels):
    valid = pseudo != 255
    right = valid & (pseudo == labels)
    true_edge, predicted_edge = near_edge(labels), near_edge(pseudo)

    def describe(mask):
        n = mask.sum().clamp(min=1).float()
        return (f"{1000 * float(mask.sum()) / float(valid.sum()):5.1f} {100 * float((mask & right).sum()) / n:6.1f} "
                f"{100 * float((mask & true_edge).sum()) / n:6.1f} {100 * float((mask & predicted_edge).sum()) / n:6.1f}")

    print(f"\nwhere the flips lie: per 1k valid pixels, % right, % within 2 px of a true edge, of a predicted edge")
    print(f"{'':6s}{'indicator':10s} {'nbrs':>4s} {'k':>2s} {'keep%':>5s} | {'added':>26s} | {'dropped':>26s} | "
          f"{'all valid pixels':>26s}")
    for setting, keep, keep_raw in rows:
        print(f"flips {setting} | {describe(keep & ~keep_raw)} | {describe(keep_raw & ~keep)} | {describe(valid)}")


if __name__ == "__main__":
    sys.exit(main())
