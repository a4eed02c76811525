"""The toy study: train each row of the results table from the same starting point with the same
budget, for several seeds, and report every seed (docs/method.md, "What the toy study shows").

    python benchmarks/variants.py --seeds 0 1 2 --json study.json --plot study.png
    python benchmarks/variants.py --variants supervised s4mc --seeds 0 --opts trainer.epochs=4

The rows are those of the toy's study file, experiments/toy/study.yaml (`rows`, run by default, and
`extra_rows`), which `python -m s4mc.study` runs and tabulates like any other study; this script
adds the toy's own analysis:
  supervised      trainer.mode=sup on the labeled split, trainer.sup_epoch_length=unlabeled
                  (the labeled stream of a semi run: same iterations, schedule and batches)
  supervised_all  the same on every training label (the ceiling the split is measured against)
  cutmix_seg      the semi loop without refinement (trainer.unsupervised.refine=false)
  s4mc            the config as it is (S4MC + CutMix-Seg)
  s4mc_psi        plus the photometric strong view (trainer.unsupervised.strong_aug=true)
  unimatch        trainer.method=unimatch with its fixed threshold (trainer.unsupervised.refine=false)
  s4mc_unimatch   trainer.method=unimatch with S4MC's refinement and dynamic threshold
                  (these two are not run by default: --variants unimatch s4mc_unimatch)
  unimatch_v2     trainer.method=unimatch_v2 on the tiny ViT + DPT (net.encoder.type=vit_tiny), AdamW,
                  fixed threshold 0.95
  s4mc_unimatch_v2  the same with S4MC's refinement and dynamic threshold
                  (not run by default either: --variants unimatch_v2 s4mc_unimatch_v2). The toy has no
                  DINOv2 weights: the ViT starts from random weights, so these rows say whether the method
                  runs and how S4MC changes its selection, not what UniMatch V2 reaches with DINOv2.

Every row starts from the config's starting point (the toy's pretrained encoder) and runs the
config's epochs; nothing is tuned per row. "kept" is the share of valid unlabeled pixels that enter
the loss, "kept acc." the accuracy of those pseudo-labels against the (unused) ground truth,
averaged over the logged windows of training; "unref." is the same without the refinement, at the
same threshold gamma. "same share" is the accuracy the threshold alone gets when moved to keep as
many pixels as the refinement kept: the refinement picks better pixels, as the paper claims, only
where "kept acc." beats it. "flipped" is the refinement's reach: the share of valid pixels whose
keep/drop decision it changed (benchmarks/mask_oracle.py bounds what deciding those perfectly could
buy). --plot draws mIoU per row (mean, std, every seed) and those quantities over training, refined
(solid), unrefined (dashed) and same share (dotted), averaged over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from s4mc.config import load_config  # noqa: E402
from s4mc.errors import S4MCError  # noqa: E402
from s4mc.study import load_study, mean_std, substitute  # noqa: E402,F401  (mean_std: tests and mask_oracle)

STUDY_FILE = REPO / "experiments" / "toy" / "study.yaml"
_STUDY = load_study(STUDY_FILE)
VARIANTS = {**_STUDY.rows, **_STUDY.extra_rows}  # row name -> its --opts switches
DEFAULT_VARIANTS = list(_STUDY.rows)
SEMI_ROWS = ("cutmix_seg", "s4mc")  # the ordering the paper's tables show: s4mc > cutmix_seg > supervised
DIAGNOSTICS = {"kept": "kept_fraction", "kept_unrefined": "kept_fraction_unrefined",
               "kept_accuracy": "kept_accuracy", "kept_accuracy_unrefined": "kept_accuracy_unrefined",
               "kept_accuracy_same_share": "kept_accuracy_same_share", "flipped": "flipped_fraction"}


def row_overrides(name: str, base: dict, all_labels_list: str | None) -> list[str]:
    """The row's switches for the config `base`; supervised_all's list may be replaced."""
    opts = substitute(VARIANTS[name], base, f"{STUDY_FILE}, row {name}")
    if name == "supervised_all":
        key = "dataset.train.data_list="
        given = next((o[len(key):] for o in opts if o.startswith(key)), None)
        path = all_labels_list or given
        if path is None or not Path(path).is_file():
            raise S4MCError(f"supervised_all needs a list of every training image with labels: {path} not found "
                            f"(pass --all-labels-list)")
        opts = [o for o in opts if not o.startswith(key)] + [key + path]
    return opts


def summarise(name: str, runs: list[dict]) -> dict:
    miou = [100 * r["final"]["miou"] for r in runs]
    mean, std = mean_std(miou)
    row = {"miou": [round(v, 2) for v in miou], "mean": round(mean, 2), "std": round(std, 2),
           "best": [round(100 * r["best_miou"], 2) for r in runs],
           "iterations": [r["iterations"] for r in runs], "seconds": [round(r["seconds"], 1) for r in runs]}
    for out_key, key in DIAGNOSTICS.items():
        values = [100 * r["diagnostics"][key] for r in runs if key in r.get("diagnostics", {})]
        if values:
            row[out_key] = round(statistics.fmean(values), 2)
            row[out_key + "_per_seed"] = [round(v, 2) for v in values]
    return row


def read_curves(run_dir: Path) -> list[dict]:
    """The run's logged training windows (iteration and pseudo-label diagnostics)."""
    from s4mc.plots import load_run

    keys = ("iteration", *DIAGNOSTICS.values())
    return [{k: r[k] for k in keys if k in r} for r in load_run(run_dir)["train"] if "kept_fraction" in r]


def mean_curve(curves: list[list[dict]], key: str) -> tuple[list[int], list[float]]:
    """Average a diagnostic over seeds at the iterations every seed logged."""
    per_seed = [{r["iteration"]: r[key] for r in c if key in r} for c in curves]
    common = sorted(set.intersection(*(set(s) for s in per_seed))) if per_seed else []
    return common, [100 * statistics.fmean(s[i] for s in per_seed) for i in common]


def ordering_steps(rows: dict) -> list[tuple[str, str]]:
    """(lower, higher) for each step of the paper's ordering among the rows present."""
    order = [n for n in ("supervised", *SEMI_ROWS) if n in rows]
    return list(zip(order, order[1:]))


def check_ordering(rows: dict) -> list[tuple[str, bool]]:
    """Issue 15's criteria, evaluated on the means and seed standard deviations measured."""
    checks = []
    have = set(rows)
    if {"supervised", "supervised_all"} <= have:
        s, a = rows["supervised"], rows["supervised_all"]
        checks.append((f"learnable: all labels {a['mean']:.2f} >= 75", a["mean"] >= 75))
        checks.append((f"few labels leave a gap: {a['mean'] - s['mean']:.2f} >= 15 points",
                       a["mean"] - s["mean"] >= 15))
    for lo, hi in ordering_steps(rows):
        gap = rows[hi]["mean"] - rows[lo]["mean"]
        noise = max(rows[hi]["std"], rows[lo]["std"])
        checks.append((f"{hi} > {lo} by {gap:+.2f}, more than the larger seed std {noise:.2f}", gap > noise))
    if {"supervised", "supervised_all", "s4mc"} <= have:
        s, a, m = rows["supervised"]["mean"], rows["supervised_all"]["mean"], rows["s4mc"]["mean"]
        share = (m - s) / (a - s) if a != s else float("nan")
        checks.append((f"s4mc closes {100 * share:.0f}% of the supervised -> all-labels gap (>= 33%)",
                       share >= 1 / 3))
    if {"cutmix_seg", "s4mc"} <= have and "kept" in rows["s4mc"] and "kept" in rows["cutmix_seg"]:
        c, m = rows["cutmix_seg"], rows["s4mc"]
        checks.append((f"s4mc keeps more pixels ({m['kept']:.1f}% vs {c['kept']:.1f}%) at equal or higher "
                       f"accuracy ({m['kept_accuracy']:.1f}% vs {c['kept_accuracy']:.1f}%)",
                       m["kept"] > c["kept"] and m["kept_accuracy"] >= c["kept_accuracy"]))
    return checks


def paired(hi: list[float], lo: list[float]) -> dict:
    """hi - lo seed by seed (two rows' mIoU lists in seed order), with their mean and std."""
    diffs = [h - l for h, l in zip(hi, lo)]
    mean, std = mean_std(diffs)
    return {"per_seed": [round(d, 2) for d in diffs], "mean": round(mean, 2), "std": round(std, 2)}


def paired_gaps(rows: dict) -> dict:
    """Each step of the ordering, seed by seed. Rows with the same seed share their warm-up and data
    order, so a row-to-row difference within a seed is much less noisy than the rows' seed spreads:
    this measures how large the effect itself is, which the unpaired checks above cannot."""
    return {f"{hi} - {lo}": paired(rows[hi]["miou"], rows[lo]["miou"]) for lo, hi in ordering_steps(rows)}


def plot(path: Path, rows: dict, curves: dict, seeds: list[int]) -> None:
    from s4mc.plots import pyplot

    plt = pyplot()
    fig, (ax_miou, ax_kept, ax_acc) = plt.subplots(1, 3, figsize=(17, 4.8),
                                                   gridspec_kw={"width_ratios": [1.1, 1, 1]})
    names = list(rows)
    colours = {n: f"C{i}" for i, n in enumerate(names)}
    for i, n in enumerate(names):
        r = rows[n]
        ax_miou.bar(i, r["mean"], yerr=r["std"], color=colours[n], alpha=0.75, capsize=5)
        ax_miou.scatter([i] * len(r["miou"]), r["miou"], color="black", s=12, zorder=3)
        ax_miou.text(i, r["mean"] + r["std"] + 0.6, f"{r['mean']:.1f}", ha="center", fontsize=8)
    ax_miou.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    low = min(min(r["miou"]) for r in rows.values())
    ax_miou.set_ylim(max(0, low - 8), max(max(r["miou"]) for r in rows.values()) + 5)
    ax_miou.set_ylabel("final mIoU (%)")
    ax_miou.set_title(f"(a) mIoU, mean ± std over seeds {' '.join(map(str, seeds))} (dots: each seed)", fontsize=9)
    for ax, key, title in ((ax_kept, "kept_fraction", "(b) quantity: kept unlabeled pixels"),
                           (ax_acc, "kept_accuracy", "(c) quality: accuracy of kept pseudo-labels")):
        for n in names:
            if not curves.get(n):
                continue
            x, y = mean_curve(curves[n], key)
            ax.plot(x, y, color=colours[n], label=f"{n} (refined)" if n != "cutmix_seg" else n)
            if n != "cutmix_seg":  # without refinement the two curves coincide
                xu, yu = mean_curve(curves[n], key + "_unrefined")
                ax.plot(xu, yu, color=colours[n], linestyle="--", label=f"{n} (unrefined, same γ)")
                xs, ys = mean_curve(curves[n], key + "_same_share")  # logged for the accuracy only
                if xs:
                    ax.plot(xs, ys, color=colours[n], linestyle=":", label=f"{n} (unrefined, same share)")
        ax.set_xlabel("iteration")
        ax.set_ylabel("%")
        ax.set_title(title + ", mean over seeds", fontsize=9)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "experiments" / "toy" / "config.yaml"))
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                        help="rows to run (default: %(default)s)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds, each row runs every one")
    parser.add_argument("--opts", nargs="*", default=[], help="overrides applied to every row alike")
    parser.add_argument("--all-labels-list", default=None,
                        help="split listing every training image (supervised_all; default: "
                             "<train data_root>/splits/train_all.txt, which the toy generator writes)")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--plot", default=None, help="write the figure here (PNG; needs matplotlib)")
    parser.add_argument("--from-runs", default=None, metavar="DIR",
                        help="train nothing: summarise the runs already in DIR (<row>_seed<k>/results.json), "
                             "e.g. after running one seed per process with the same --out")
    args = parser.parse_args(argv)

    if args.plot:
        from s4mc.plots import pyplot

        try:
            pyplot()
        except S4MCError as e:  # say it before an hour of training, not after
            print(f"error: {e}", file=sys.stderr)
            return 2
    from s4mc.engine.loop import train
    from s4mc.toy_pretrain import ensure_pretrained_encoder

    out = Path(args.from_runs or args.out or tempfile.mkdtemp(prefix="s4mc_variants_"))
    common = [*args.opts, f"output_dir={out}", "trainer.image_every=0"]
    base = load_config(args.config, common)
    if not args.from_runs:
        ensure_pretrained_encoder(base)  # every row starts from the same file: build it once, up front
    started = time.perf_counter()
    runs: dict[str, list[dict]] = {n: [] for n in args.variants}
    curves: dict[str, list[list[dict]]] = {n: [] for n in args.variants}
    for seed in args.seeds:
        for name in args.variants:
            run_dir = out / f"{name}_seed{seed}"
            if args.from_runs:
                if not (run_dir / "results.json").is_file():
                    print(f"error: {run_dir / 'results.json'} not found (--from-runs {out})", file=sys.stderr)
                    return 2
                summary = json.loads((run_dir / "results.json").read_text())
            else:
                cfg = load_config(args.config, [*common, f"seed={seed}",
                                                *row_overrides(name, base, args.all_labels_list)])
                summary = train(cfg, name=run_dir.name)
            runs[name].append(summary)
            if name not in ("supervised", "supervised_all"):
                curves[name].append(read_curves(run_dir))
            print(f"[{name} seed {seed}] mIoU {100 * summary['final']['miou']:.2f} "
                  f"in {summary['seconds']:.0f}s", flush=True)
    rows = {n: summarise(n, runs[n]) for n in args.variants}
    elapsed = time.perf_counter() - started

    if args.from_runs:  # the training time is the runs' own
        elapsed = sum(sum(r["seconds"] for r in rs) for rs in runs.values())
    print(f"\n{len(args.seeds)} seed(s) x {len(rows)} rows, {elapsed / 60:.1f} min of training; runs in {out}")
    print(f"{'row':<15}{'mIoU per seed':<26}{'mean':>7}{'std':>6}   kept (unref.)   kept acc. (unref.)   same share"
          f"   flipped")
    for n, r in rows.items():
        per_seed = " ".join(f"{v:6.2f}" for v in r["miou"])
        # A fixed-threshold row (unimatch, unimatch_v2) logs the kept share only: its selection is unrefined.
        kept = f"{r['kept']:5.1f} ({r.get('kept_unrefined', r['kept']):5.1f})" if "kept" in r else "      -      "
        acc = (f"{r['kept_accuracy']:5.1f} ({r.get('kept_accuracy_unrefined', r['kept_accuracy']):5.1f})"
               if "kept_accuracy" in r else "      -")
        same = f"{r['kept_accuracy_same_share']:5.1f}" if "kept_accuracy_same_share" in r else "  -"
        flipped = f"{r['flipped']:5.2f}" if "flipped" in r else "  -"
        print(f"{n:<15}{per_seed:<26}{r['mean']:7.2f}{r['std']:6.2f}   {kept}   {acc}        {same}      {flipped}")
    checks = check_ordering(rows)
    if checks:
        print("\nchecks (issue 15):")
        for text, ok in checks:
            print(f"  [{'ok' if ok else 'NO'}] {text}")
    paired = paired_gaps(rows)
    if paired and len(args.seeds) > 1:
        print("\npaired by seed (same warm-up and data order; informative, not one of the checks):")
        for pair, g in paired.items():
            print(f"  {pair:<26} {' '.join(f'{d:+6.2f}' for d in g['per_seed'])}   "
                  f"mean {g['mean']:+.2f} ± {g['std']:.2f}")
    if args.json:
        result = {"variants": rows, "seeds": args.seeds, "config": str(Path(args.config).resolve().relative_to(REPO))
                  if Path(args.config).resolve().is_relative_to(REPO) else args.config,
                  "opts": args.opts, "minutes": round(elapsed / 60, 1),
                  "checks": [{"check": t, "holds": ok} for t, ok in checks], "paired": paired}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(Path(args.plot), rows, curves, args.seeds)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
