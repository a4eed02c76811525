"""Train the rows of the results table on the toy dataset with one iteration budget and
print final mIoU and the pseudo-label diagnostics (the paper's quantity/quality view).

    python benchmarks/variants.py                    # toy config, ~8 minutes on 2 CPU cores
    python benchmarks/variants.py --variants s4mc cutmix_seg --opts trainer.epochs=6

Rows: supervised only (20 labeled images, same number of iterations), CutMix-Seg
(S4MC's loop without refinement), S4MC, S4MC psi (plus the photometric strong view).
kept = share of valid unlabeled pixels that enter the loss; acc = accuracy of those kept
pseudo-labels against the toy set's ground truth; both means over the logged windows,
with and without refinement (the same gamma).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from s4mc.config import load_config  # noqa: E402
from s4mc.engine.loop import train  # noqa: E402

VARIANTS = {
    "supervised": ["trainer.mode=sup"],
    "cutmix_seg": ["trainer.unsupervised.refine=false"],
    "s4mc": [],
    "s4mc_psi": ["trainer.unsupervised.strong_aug=true"],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "experiments" / "toy" / "config.yaml"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--opts", nargs="*", default=[], help="overrides applied to every variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="run directory root (default: a temporary folder)")
    args = parser.parse_args(argv)

    out = Path(args.out or tempfile.mkdtemp(prefix="s4mc_variants_"))
    base = load_config(args.config, [*args.opts, f"seed={args.seed}", f"output_dir={out}"])
    rows = []
    semi_iters = None
    for name in args.variants:
        opts = [*args.opts, f"seed={args.seed}", f"output_dir={out}", "trainer.image_every=0", *VARIANTS[name]]
        if name == "supervised":
            # Same iteration budget as the semi-supervised rows: epochs over the labeled list only.
            from s4mc.data import build_train_loaders

            semi = build_train_loaders(base, seed=args.seed)
            per_epoch_sup = len(build_train_loaders(base, seed=args.seed, labeled_only=True).labeled)
            semi_iters = base["trainer"]["epochs"] * len(semi.unlabeled)
            if base["trainer"]["max_iters"]:
                semi_iters = min(semi_iters, base["trainer"]["max_iters"])
            epochs = math.ceil(semi_iters / per_epoch_sup)
            opts += [f"trainer.epochs={epochs}", f"trainer.max_iters={semi_iters}",
                     f"trainer.eval_every={epochs}"]
        cfg = load_config(args.config, opts)
        summary = train(cfg, name=name)
        diag = summary.get("diagnostics", {})
        rows.append({"variant": name, "iterations": summary["iterations"], "miou": summary["final"]["miou"],
                     "best_miou": summary["best_miou"], "seconds": round(summary["seconds"], 1), **diag})

    def pct(row, key):
        return f"{100 * row[key]:6.1f}" if key in row else "     -"

    print("\nvariant        iters  mIoU   best   kept  kept(unref)  acc   acc(unref)  time")
    for row in rows:
        print(f"{row['variant']:<13} {row['iterations']:5d} {100 * row['miou']:6.2f} {100 * row['best_miou']:6.2f}"
              f" {pct(row, 'kept_fraction')} {pct(row, 'kept_fraction_unrefined')}     "
              f"{pct(row, 'kept_accuracy')} {pct(row, 'kept_accuracy_unrefined')}    {row['seconds']:5.0f}s")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
