"""Time s4mc.pseudo_label.pseudo_label_loss against a straightforward release-style version.

The release-style version does what the original code did: the percentile with numpy on
the host (`.cpu().numpy()` of the masked indicator), the neighbour maps stacked from
shifted zero-padded copies and sorted, the target edited by boolean indexing.

    python benchmarks/method.py --size 513 --runs 5 --device auto

Prints every run, the medians and their ratio, then one line of JSON.
"""
import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from s4mc import pseudo_label  # noqa: E402
from s4mc.data.priors import PRIORS  # noqa: E402

OFFSETS = {4: [(-1, 0), (1, 0), (0, -1), (0, 1)],
           8: [(-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)]}


def release_style_loss(student, teacher, label, keep_percent, neighbors, k, prior):
    """Margin indicator only, which is what the benchmark exercises."""
    batch, _, height, width = student.shape
    with torch.no_grad():
        prob = torch.softmax(teacher, dim=1)
        top2 = prob.topk(2, dim=1).values
        margin = top2[:, 0] - top2[:, 1]
        gamma = np.percentile(margin[label != 255].cpu().numpy().flatten(), 100 - keep_percent)
        padded = F.pad(prob, (1, 1, 1, 1))
        shifted = torch.stack([padded[:, :, 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
                               for dy, dx in OFFSETS[neighbors]], dim=0)
        ordered = shifted.sort(dim=0, descending=True).values[:k]
        e = prior.view(1, -1, 1, 1)
        beta = math.exp(-0.5)
        for q in ordered:
            prob = prob + beta * q - beta * torch.max(prob * q, prob * e)
        top2 = prob.topk(2, dim=1).values
        refined_margin = top2[:, 0] - top2[:, 1]
        target = label.clone()
        target[(refined_margin <= gamma) & (label != 255)] = 255
        weight = batch * height * width / torch.sum(target != 255)
    return weight * F.cross_entropy(student, target, ignore_index=255)


def _time_interleaved(fns, device, runs, warmup):
    """Alternate the contenders run by run, so that a change in machine load hits both."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        for fn in fns:
            fn()
    sync()
    times = [[] for _ in fns]
    for _ in range(runs):
        for fn, record in zip(fns, times):
            start = time.perf_counter()
            fn()
            sync()
            record.append(time.perf_counter() - start)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=513, help="height and width (default 513)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--neighbors", type=int, default=4, choices=(4, 8))
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--keep-percent", type=float, default=80.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--ground-truth", action="store_true",
                        help="also compute the kept-accuracy diagnostics, as a training step does")
    parser.add_argument("--backward", action="store_true", help="time forward + backward, as in a training step")
    parser.add_argument("--profile", metavar="FILE", help="write a per-kernel time table of 3 calls of ours to FILE")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, args.classes, args.size, args.size)
    teacher = (torch.randn(shape, generator=g) * 3).to(device)
    student = torch.randn(shape, generator=g).to(device).requires_grad_(args.backward)
    label = teacher.argmax(1)
    label[(torch.rand(label.shape, generator=g) < 0.05).to(device)] = 255
    table = PRIORS.get("pascal") if args.classes == 21 else [0.95] * args.classes
    prior = torch.tensor(table, device=device)

    ground_truth = label.clone() if args.ground_truth else None

    def ours():
        out = pseudo_label.pseudo_label_loss(student, teacher, label, args.keep_percent, indicator="margin",
                                       neighbors=args.neighbors, k=args.k, prior=prior, ground_truth=ground_truth)
        if args.backward:
            out[0].backward()
        return out

    def release():
        out = release_style_loss(student, teacher, label, args.keep_percent, args.neighbors, args.k, prior)
        if args.backward:
            out.backward()
        return out

    loss_ours, _, stats = ours()  # (loss, target, stats)
    loss_release = release()
    agree = math.isclose(float(loss_ours.detach()), float(loss_release.detach()), rel_tol=1e-4)

    t_ours, t_release = _time_interleaved([ours, release], device, args.runs, args.warmup)
    m_ours, m_release = statistics.median(t_ours), statistics.median(t_release)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        cuda = device.type == "cuda"
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(3):
                ours()
            if cuda:
                torch.cuda.synchronize(device)
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        Path(args.profile).write_text(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70))
    print(f"device {device}, inputs {list(shape)}, neighbors {args.neighbors}, k {args.k}, "
          f"threads {torch.get_num_threads()}")
    print(f"losses: ours {float(loss_ours.detach()):.6f}  release-style {float(loss_release.detach()):.6f}  agree {agree}; "
          f"kept {float(stats['kept_fraction']):.4f}")
    print("ours          runs (s): " + " ".join(f"{t:.4f}" for t in t_ours) + f"  median {m_ours:.4f}")
    print("release-style runs (s): " + " ".join(f"{t:.4f}" for t in t_release) + f"  median {m_release:.4f}")
    print(f"speed-up (release-style / ours): {m_release / m_ours:.2f}x")
    print(json.dumps({
        "benchmark": "pseudo_label.pseudo_label_loss", "device": str(device), "shape": list(shape),
        "neighbors": args.neighbors, "k": args.k, "runs": args.runs,
        "ground_truth": args.ground_truth, "backward": args.backward,
        "ours_s": [round(t, 5) for t in t_ours], "release_style_s": [round(t, 5) for t in t_release],
        "ours_median_s": round(m_ours, 5), "release_style_median_s": round(m_release, 5),
        "speedup": round(m_release / m_ours, 3), "losses_agree": agree,
    }))


if __name__ == "__main__":
    main()
