"""How much could any pixel selection buy on the toy? Upper bounds for S4MC over CutMix-Seg, and a control.

    python benchmarks/mask_oracle.py --oracles flips mask moved --seeds 0 1 2 --out DIR
    python benchmarks/mask_oracle.py --from-runs DIR --seeds 0 1 2 [--json PATH]

Each oracle row is the toy config exactly as the `s4mc` row of benchmarks/variants.py runs it (same
starting point, budget, seed, teacher and pseudo-labels), except that the keep/drop decision of
docs/method.md step 7 reads the unlabeled images' ground truth. No method can do that; the rows are
bounds, not methods:

  oracle_flips  the pixels whose decision the refinement changes (kept by exactly one of the refined
                and the unrefined mask, at the same gamma) are kept exactly when their pseudo-label is
                right: the most that any choice among those pixels, i.e. a perfect neighbour rule of
                the same reach, could add to CutMix-Seg
  oracle_mask   every pixel whose pseudo-label is right is kept and every wrong one dropped: the most
                that any keep/drop rule could add, with the teacher's pseudo-labels as they are

and one control that reads no ground truth:

  moved_threshold  as many pixels as S4MC's refined mask keeps, chosen by the unrefined indicator alone
                (the threshold moved to keep that share; ties by position): what the refinement is
                worth beyond the number of pixels it keeps, the training-time twin of the logged
                `kept_accuracy_same_share`

The loss, its scaling and everything else are the method's. `--from-runs` reads the oracle runs and
the study's `cutmix_seg` and `s4mc` runs from the same folder (benchmarks/variants.py --out DIR) and
prints every seed, the rows' means and spreads, and each row minus CutMix-Seg paired by seed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import variants  # noqa: E402  (benchmarks/variants.py: the study's runner and summaries)

from s4mc import pseudo_label as selection  # noqa: E402
from s4mc.diagnostics import pseudo_label_diagnostics, reliability_order  # noqa: E402
from s4mc.errors import S4MCError  # noqa: E402

ORACLES = {"flips": "oracle_flips", "mask": "oracle_mask", "moved": "moved_threshold"}
DESCRIBE = {"flips": "the pixels whose decision the refinement changes are kept exactly when right; an upper "
                     "bound, not a method",
            "mask": "every right pseudo-label kept, every wrong one dropped; an upper bound, not a method",
            "moved": "as many pixels as the refinement keeps, chosen by the unrefined indicator; reads no "
                     "ground truth"}
COMPARED = ("cutmix_seg", "s4mc")


def oracle_keep(keep, keep_unrefined, right, mode):
    """The oracle's kept pixels, from the refined and unrefined masks (same gamma) and the right ones."""
    if mode == "mask":
        return right
    if mode == "flips":
        return (keep & keep_unrefined) | ((keep ^ keep_unrefined) & right)
    raise ValueError(f"unknown oracle {mode!r}; expected one of {sorted(ORACLES)}")


def moved_threshold_keep(raw, valid, count, low_is_reliable=False):
    """The `count` valid pixels the unrefined indicator `raw` ranks most reliable (ties by position)."""
    order = reliability_order(raw, valid, low_is_reliable)  # the ranking kept_accuracy_same_share uses
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return (rank < count).view_as(valid) & valid


def oracle_target_fn(mode, original=selection.pseudo_label_target):
    """A drop-in for `s4mc.pseudo_label.pseudo_label_target` whose mask is `oracle_keep`'s (or, for "moved",
    `moved_threshold_keep`'s)."""
    def target(teacher_logits, pseudo_label, keep_percent, *, ground_truth=None, ignore_index=255, **kwargs):
        if ground_truth is None and mode != "moved":
            raise S4MCError(f"oracle_{mode} reads the unlabeled images' ground truth, and this step has none")
        kwargs.pop("refine", None)
        refined, stats = original(teacher_logits, pseudo_label, keep_percent, ignore_index=ignore_index,
                                  refine=True, **kwargs)
        unrefined, _ = original(teacher_logits, pseudo_label, keep_percent, ignore_index=ignore_index,
                                refine=False, **kwargs)
        pseudo_label = pseudo_label.long()
        valid = pseudo_label != ignore_index
        keep_unrefined = unrefined != ignore_index
        keep = refined != ignore_index
        if mode == "moved":
            indicator = kwargs.get("indicator", "margin")
            raw = selection.indicator_map(torch.softmax(teacher_logits.detach().float(), dim=1), indicator)
            keep = moved_threshold_keep(raw, valid, keep.sum(), low_is_reliable=indicator == "entropy")
        else:
            keep = oracle_keep(keep, keep_unrefined, valid & (pseudo_label == ground_truth), mode)
        diagnostics = pseudo_label_diagnostics(valid, keep, keep_unrefined, pseudo_label, ground_truth, ignore_index)
        return pseudo_label.masked_fill(~keep, ignore_index), {"threshold": stats["threshold"], **diagnostics}
    return target


@contextlib.contextmanager
def oracle(mode):
    """Swap the oracle into `s4mc.pseudo_label` for the runs inside (every method reaches step 7 through it)."""
    original = selection.pseudo_label_target
    selection.pseudo_label_target = oracle_target_fn(mode, original)
    try:
        yield
    finally:
        selection.pseudo_label_target = original


def train_rows(args) -> int:
    for mode in args.oracles:
        name = ORACLES[mode]
        variants.VARIANTS[name] = list(variants.VARIANTS["s4mc"])
        with oracle(mode):
            code = variants.main(["--config", args.config, "--variants", name, "--seeds", *map(str, args.seeds),
                                  "--out", args.out, "--opts", *args.opts])
        if code:
            return code
        for seed in args.seeds:  # the run's own header describes the s4mc row it was swapped into
            (Path(args.out) / f"{name}_seed{seed}" / "ORACLE.txt").write_text(
                f"{name}: trained by benchmarks/mask_oracle.py with step 7's keep/drop decision replaced: "
                f"{DESCRIBE[mode]}.\n")
    return 0


def summarise(args) -> int:
    out = Path(args.from_runs)
    names = [n for n in (*COMPARED, *ORACLES.values())
             if all((out / f"{n}_seed{s}" / "results.json").is_file() for s in args.seeds)]
    if "cutmix_seg" not in names or len(names) < 2:
        print(f"error: {out} needs cutmix_seg_seed<k> and at least one other row for seeds {args.seeds} "
              f"(found: {', '.join(names) or 'none'})", file=sys.stderr)
        return 2
    rows = {n: variants.summarise(n, [json.loads((out / f"{n}_seed{s}" / "results.json").read_text())
                                      for s in args.seeds]) for n in names}
    print(f"seeds {' '.join(map(str, args.seeds))}; runs in {out}")
    width = 8 * len(args.seeds) + 2
    print(f"{'row':<17}{'mIoU per seed':<{width}}{'mean':>7}{'std':>6}   kept   kept acc.   "
          f"minus cutmix_seg, paired by seed")
    base = rows["cutmix_seg"]["miou"]
    minus_cutmix = {}
    for n, r in rows.items():
        g = minus_cutmix[n] = variants.paired(r["miou"], base)
        kept = f"{r['kept']:5.1f}   {r['kept_accuracy']:5.1f}" if "kept" in r else "    -       -"
        gap = "" if n == "cutmix_seg" else f"{' '.join(f'{d:+6.2f}' for d in g['per_seed'])}   mean {g['mean']:+.2f} ± {g['std']:.2f}"
        print(f"{n:<17}{' '.join(f'{v:7.2f}' for v in r['miou']):<{width}}"
              f"{r['mean']:7.2f}{r['std']:6.2f}   {kept}     {gap}")
    spread = max(rows[n]["std"] for n in COMPARED if n in rows)
    print(f"\nissue 15 asks S4MC to beat CutMix-Seg by more than the larger of their seed spreads, {spread:.2f} here;")
    for n in ("oracle_flips", "oracle_mask"):
        if n in rows:
            verdict = "could" if rows[n]["mean"] - rows["cutmix_seg"]["mean"] > spread else "could not"
            print(f"  {n}: {rows[n]['mean'] - rows['cutmix_seg']['mean']:+.2f} over CutMix-Seg's mean; a selection "
                  f"this good {verdict} clear it")
    beyond_count = None
    if "moved_threshold" in rows and "s4mc" in rows:
        g = beyond_count = variants.paired(rows["s4mc"]["miou"], rows["moved_threshold"]["miou"])
        print(f"  s4mc - moved_threshold, paired by seed (what the refinement's choice is worth beyond the number of "
              f"pixels it keeps): {' '.join(f'{d:+.2f}' for d in g['per_seed'])}   mean {g['mean']:+.2f} ± {g['std']:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"variants": rows, "seeds": args.seeds, "minus_cutmix_seg": minus_cutmix,
                                               "s4mc_minus_moved_threshold": beyond_count, "spread": spread}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "experiments" / "toy" / "config.yaml"))
    parser.add_argument("--oracles", nargs="+", default=list(ORACLES), choices=list(ORACLES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--opts", nargs="*", default=[], help="overrides applied to every row alike")
    parser.add_argument("--out", default=None, help="folder for the runs (the study's, to pair with its rows)")
    parser.add_argument("--from-runs", default=None, metavar="DIR", help="train nothing: summarise DIR")
    parser.add_argument("--json", default=None, help="with --from-runs: write the summary here")
    args = parser.parse_args(argv)
    if args.from_runs:
        return summarise(args)
    if not args.out:
        parser.error("--out is required to train (the study's folder, so that the rows pair by seed)")
    return train_rows(args)


if __name__ == "__main__":
    sys.exit(main())
