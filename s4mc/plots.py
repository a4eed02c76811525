"""Draw runs from their saved logs: mIoU over training and the pseudo-labels' quantity/quality.

    python -m s4mc.plots runs/toy_seed0 runs/toy_cutmix --out compare.png

Every run writes `metrics.jsonl` (see `s4mc.logs.MetricsLog`). This reads those files, so two
runs can be compared side by side without TensorBoard. The quantity/quality view is the
paper's: the share of unlabeled pixels that enter the loss (kept fraction) and the accuracy of
those kept pseudo-labels against the ground truth, with (solid) and without (dashed) the
neighbour refinement, at the same threshold gamma (docs/method.md, steps 5-7).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from s4mc.errors import S4MCError

MATPLOTLIB_MISSING = "matplotlib is needed to draw plots: pip install matplotlib"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or one clear error."""
    try:  # imported here: matplotlib is optional and needs its backend chosen before pyplot
        import matplotlib
    except ImportError:
        raise S4MCError(MATPLOTLIB_MISSING) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_run(run_dir: str | Path) -> dict:
    """{"name", "train": [records], "val": [records]} from RUN_DIR/metrics.jsonl."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        hint = "" if run_dir.is_dir() else " (the folder does not exist)"
        raise S4MCError(f"{path}: no metrics log{hint}; pass a run directory written by train_semi.py")
    train, val = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise S4MCError(f"{path}, line {number}: not JSON ({e.msg})") from None
        (val if record.get("kind") == "val" else train).append(record)
    return {"name": run_dir.name, "train": train, "val": val, "protocol": selecting_protocol(run_dir, val)}


def selecting_protocol(run_dir: Path, val: list[dict]) -> str | None:
    """The evaluation mode of the run's "miou" (the one that selects best.pth): from the val
    records, or for a run written before they carried it, its environment.json's header facts."""
    for record in val:
        if record.get("protocol"):
            return record["protocol"]
    try:
        facts = json.loads((run_dir / "environment.json").read_text(encoding="utf-8"))["protocol"]["evaluation"]
        return next(e["mode"] for e in facts if e.get("selects_best"))
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(iterations, values) of the records that carry `key`."""
    pairs = [(r["iteration"], r[key]) for r in records if key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def draw_quantity_quality(ax_kept, ax_acc, curves: dict[str, list[dict]], colours=None) -> None:
    """Kept fraction and kept-pixel accuracy (%) over iterations, refined solid, unrefined dashed,
    and (accuracy only, where logged) the threshold alone at the refined share dotted.

    `curves` maps a label to its train records; runs without pseudo-labels are skipped.
    """
    for i, (label, records) in enumerate(curves.items()):
        colour = (colours or {}).get(label, f"C{i}")
        for ax, key in ((ax_kept, "kept_fraction"), (ax_acc, "kept_accuracy")):
            x, y = series(records, key)
            if not x:
                continue
            ax.plot(x, [100 * v for v in y], color=colour, label=f"{label} refined")
            xu, yu = series(records, key + "_unrefined")
            ax.plot(xu, [100 * v for v in yu], color=colour, linestyle="--", label=f"{label} unrefined")
            xs, ys = series(records, key + "_same_share")
            if xs:  # what the threshold alone keeps at the refined share: the bar the refinement must clear
                ax.plot(xs, [100 * v for v in ys], color=colour, linestyle=":", label=f"{label} same share")
    ax_kept.set_ylabel("kept unlabeled pixels (%)")
    ax_acc.set_ylabel("accuracy of kept pseudo-labels (%)")
    for ax in (ax_kept, ax_acc):
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)


def axis_label(protocols: set[str]) -> str:
    """The mIoU axis's name, with the evaluation protocol when all runs share one."""
    if len(protocols) == 1:
        return f"validation mIoU (%), {next(iter(protocols))} (selects best.pth)"
    return "validation mIoU (%), each run's selecting protocol"


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """One PNG: mIoU over training, kept fraction, kept accuracy, one colour per run."""
    plt = pyplot()
    runs = [load_run(d) for d in run_dirs]
    names = [r["name"] for r in runs]
    if len(set(names)) < len(names):  # same folder name under different parents
        names = [str(Path(d)) for d in run_dirs]
    fig, (ax_miou, ax_kept, ax_acc) = plt.subplots(1, 3, figsize=(16, 4.5))
    protocols = {run["protocol"] or "protocol not recorded" for run in runs}
    for i, (name, run) in enumerate(zip(names, runs)):
        x, y = series(run["val"], "miou")
        label = name if len(protocols) == 1 else f"{name} ({run['protocol'] or 'protocol not recorded'})"
        ax_miou.plot(x, [100 * v for v in y], marker="o", color=f"C{i}", label=label)
    ax_miou.set_xlabel("iteration")
    # The protocol that selects best.pth (centre crop on VOC, whole image or sliding window elsewhere).
    ax_miou.set_ylabel(axis_label(protocols))
    ax_miou.grid(alpha=0.3)
    ax_miou.legend(fontsize=7)
    draw_quantity_quality(ax_kept, ax_acc, {n: r["train"] for n, r in zip(names, runs)})
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m s4mc.plots",
        description="Plot one or more runs from their metrics.jsonl: validation mIoU over training, and the "
                    "pseudo-labels' kept fraction and kept-pixel accuracy (refined solid, unrefined dashed, and "
                    "the unrefined threshold moved to the refined share dotted).")
    parser.add_argument("runs", nargs="+", help="run directories (runs/<name>)")
    parser.add_argument("--out", default="runs.png", help="PNG to write (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        out = plot_runs(args.runs, args.out)
    except S4MCError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
