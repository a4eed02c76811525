"""GPU probe: three exact top-2 margin implementations, alone and inside the full loss.

    python benchmarks/margin_variants.py             # needs CUDA; prints one line per variant
    python benchmarks/margin_variants.py --dry-run   # CPU, tiny inputs, one timed run: checks it runs

Kept because it decided `pseudo_label.indicator_map`: the running top-2 (`loop`) beat two
max-reductions (`amax`) and `topk` on an H200 (benchmarks/RESULTS.md).
"""
import argparse, math, statistics, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from s4mc import pseudo_label
from s4mc.data.priors import PRIORS

_METHOD_INDICATOR = pseudo_label.indicator_map  # held here: the timing loop below patches the module


def loop(prob):
    return _METHOD_INDICATOR(prob, "margin")  # the running top-2 the method uses


def amax(prob):
    first = prob.amax(dim=1, keepdim=True); is_max = prob == first
    second = prob.masked_fill(is_max, -math.inf).amax(dim=1)
    return (first.squeeze(1) - second).masked_fill_(is_max.sum(dim=1) > 1, 0.0)

def topk(prob):
    t = prob.topk(2, dim=1).values
    return t[:, 0] - t[:, 1]

def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)

def bench(fn, dev, runs=15, warmup=3):
    for _ in range(warmup): fn()
    sync(dev); ts = []
    for _ in range(runs):
        t0 = time.perf_counter(); fn(); sync(dev); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="on the CPU at 2x21x17x17 with one timed run: builds and runs everything, times nothing useful")
    args = ap.parse_args(argv)
    if args.dry_run:
        dev, shape, runs, warmup = torch.device("cpu"), (2, 21, 17, 17), 1, 1
    elif torch.cuda.is_available():
        dev, shape, runs, warmup = torch.device("cuda"), (8, 21, 513, 513), 15, 3
    else:
        sys.exit("margin_variants.py needs a CUDA device (--dry-run checks it on the CPU)")
    g = torch.Generator().manual_seed(0)
    teacher = (torch.randn(shape, generator=g) * 3).to(dev)
    student = torch.randn(shape, generator=g).to(dev).requires_grad_()
    label = teacher.argmax(1); prior = torch.tensor(PRIORS["pascal"], device=dev)
    prob = teacher.softmax(1)
    ref = loop(prob)
    print(f"device {dev}, inputs {list(shape)}, {runs} timed runs (median)", flush=True)
    for name, fn in (("loop", loop), ("amax", amax), ("topk", topk)):
        assert torch.equal(fn(prob), ref), name
        ms = bench(lambda: fn(prob), dev, runs, warmup)
        pseudo_label.indicator_map = (lambda p, indicator="margin", fn=fn: fn(p))
        try:
            full = bench(lambda: pseudo_label.pseudo_label_loss(student, teacher, label, 80.0, prior=prior,
                                                          ground_truth=label)[0].backward(), dev, runs, warmup)
        finally:
            pseudo_label.indicator_map = _METHOD_INDICATOR
        print(f"{name:5s} margin {ms:.3f} ms   full loss fwd+bwd with gt {full:.3f} ms", flush=True)

if __name__ == "__main__":
    main()
