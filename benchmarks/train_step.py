r"""Time the real training step (s4mc.engine.step.train_step) on synthetic batches.

    python benchmarks/train_step.py                       # CPU: tiny toy model, tiny size
    python benchmarks/train_step.py --config experiments/pascal/366/config.yaml --batch 8 --size 513 \
        --amp bf16 --channels-last                        # GPU: the published setting
    python benchmarks/train_step.py --release-baseline    # the original release's computation

For each setting it prints one JSON line: median step time over the timed iterations,
images/s (labeled + unlabeled), peak GPU memory, the median time of the S4MC
pseudo-label loss at the step's shapes and its share of the step, device and torch
version. `--release-baseline` runs the same step in fp32, without channels_last or a
fused optimizer, with the release-style loss of benchmarks/method.py (host-side numpy
percentile, stacked neighbour maps).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from s4mc import pseudo_label as s4mc_method  # noqa: E402
from s4mc.config import load_config  # noqa: E402
from s4mc.distributed import DistInfo  # noqa: E402
from s4mc.engine import loop, step  # noqa: E402


def release_loss_wrapper():
    spec = importlib.util.spec_from_file_location("method_bench", REPO / "benchmarks" / "method.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def loss(student, teacher, label, keep, *, neighbors, k, prior, **_):
        num_classes = teacher.shape[1]
        prior = prior if prior is not None else torch.zeros(num_classes, device=teacher.device)
        # No target: the benchmark never captures visuals.
        return bench.release_style_loss(student.float(), teacher.float(), label, keep, neighbors, k, prior), None, {}

    return loss


def synthetic_batch(batch: int, size: int, num_classes: int, device, generator) -> dict:
    # Spatially coherent labels (upsampled coarse noise), so refinement sees real regions.
    coarse = torch.randint(0, num_classes, (batch, 1, max(size // 32, 2), max(size // 32, 2)), generator=generator)
    label = torch.nn.functional.interpolate(coarse.float(), size=(size, size), mode="nearest").long()[:, 0]
    image = torch.randn(batch, 3, size, size, generator=generator)
    return {"image": image.to(device), "label": label.to(device)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(state, cfg, batches, iters: int, warmup: int) -> tuple[float, list[float]]:
    """(first step's wall time, per-iteration times of the timed window). The first step carries
    compilation and cuDNN autotuning; the window has one host sync at each end on CUDA."""
    labeled, unlabeled = batches
    sync(state.device)
    t0 = time.perf_counter()
    step.train_step(state, [(labeled, unlabeled)], cfg)  # includes torch.compile's compilation when on
    sync(state.device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step.train_step(state, [(labeled, unlabeled)], cfg)
    sync(state.device)
    times = []
    if state.device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
        events[0].record()
        for i in range(iters):
            step.train_step(state, [(labeled, unlabeled)], cfg)
            events[i + 1].record()
        sync(state.device)
        times = [events[i].elapsed_time(events[i + 1]) / 1000 for i in range(iters)]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            step.train_step(state, [(labeled, unlabeled)], cfg)
            times.append(time.perf_counter() - t0)
    return first, times


def profile_steps(state, cfg, batches, path: Path, steps: int = 2) -> None:
    """Write the per-kernel device-time table of a few steps to `path` (after timing)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if state.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step.train_step(state, [batches], cfg)
        sync(state.device)
    key = "self_device_time_total" if state.device.type == "cuda" else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70))


def time_loss(fn, cfg, batch: int, size: int, num_classes: int, device, prior, runs: int, maps=None) -> float:
    """Median time of the loss, forward + backward, as the step runs it (with `maps`, the compiled
    dense part under --compile), with host syncs around each call."""
    g = torch.Generator().manual_seed(1)
    student = torch.randn(batch, num_classes, size, size, generator=g).to(device).requires_grad_()
    teacher = torch.randn(batch, num_classes, size, size, generator=g).to(device)
    label = teacher.argmax(1)
    unsup = cfg["trainer"]["unsupervised"]
    kwargs = dict(indicator=unsup["indicator"], neighbors=unsup["neighborhood_size"], k=unsup["num_neighbors"],
                  prior=prior, refine=unsup["refine"], ground_truth=label, maps=maps)
    for _ in range(2):
        fn(student, teacher, label, 80.0, **kwargs)[0].backward()
    out = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        fn(student, teacher, label, 80.0, **kwargs)[0].backward()
        sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def run_setting(args, amp: str, channels_last: bool, compile_: bool, batch: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    opts = [f"dataset.batch_size={batch}", f"trainer.amp={amp}", f"trainer.channels_last={str(channels_last).lower()}",
            f"trainer.compile={str(compile_).lower()}", "trainer.sup_only_epoch=0", "net.encoder.pretrained=null",
            "net.sync_bn=false", f"dataset.train.crop.size=[{args.size}, {args.size}]"]
    if args.release_baseline:
        opts.append("trainer.optimizer.fused=false")
    cfg = load_config(args.config, opts + list(args.opts))
    num_classes = cfg["net"]["num_classes"]
    state = loop.build_state(cfg, DistInfo(device=device), iters_per_epoch=1000)
    if args.release_baseline:
        loop.set_rep_output(state.student_module, True)  # the release always computed `rep`
        loop.set_rep_output(state.teacher, True)
    g = torch.Generator().manual_seed(0)
    batches = (synthetic_batch(batch, args.size, num_classes, device, g),
               synthetic_batch(batch, args.size, num_classes, device, g))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    original = s4mc_method.pseudo_label_loss
    loss_fn = release_loss_wrapper() if args.release_baseline else original
    s4mc_method.pseudo_label_loss = loss_fn
    try:
        first_s, times = time_step(state, cfg, batches, args.iters, args.warmup)
        if args.profile:
            profile_steps(state, cfg, batches, Path(args.profile))
        loss_s = time_loss(loss_fn, cfg, batch, args.size, num_classes, device, state.prior, max(3, args.iters // 2),
                           maps=state.indicator_maps)
    finally:
        s4mc_method.pseudo_label_loss = original
    median = statistics.median(times)
    return {
        "setting": "release-baseline" if args.release_baseline else "s4mc",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": str(Path(args.config).resolve().relative_to(REPO)) if str(args.config).startswith(str(REPO)) else str(args.config),
        "batch": f"{batch}+{batch}",
        "size": args.size,
        "amp": amp,
        "channels_last": channels_last,
        "compile": compile_,
        "first_step_s": round(first_s, 2),  # compilation and cudnn autotuning show here
        "median_step_s": round(median, 5),
        "step_times_s": [round(t, 5) for t in times],
        "images_per_s": round(2 * batch / median, 2),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "s4mc_loss_s": round(loss_s, 5),
        "s4mc_loss_share": round(loss_s / median, 4),
    }


def main(argv=None) -> int:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / ("experiments/pascal/366/config.yaml" if on_gpu
                                                          else "experiments/toy/config.yaml")))
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto")
    parser.add_argument("--batch", type=int, nargs="+", default=[8 if on_gpu else 2], help="per-step batch, each of labeled and unlabeled")
    parser.add_argument("--size", type=int, default=513 if on_gpu else 64, help="square crop size")
    parser.add_argument("--amp", nargs="+", default=["bf16" if on_gpu else "off"], choices=("off", "bf16", "fp16"))
    parser.add_argument("--channels-last", choices=("on", "off", "both"), default="on" if on_gpu else "off")
    parser.add_argument("--compile", action="store_true", help="trainer.compile: torch.compile the student, the teacher and the loss's dense maps")
    parser.add_argument("--release-baseline", action="store_true", help="fp32, no channels_last, release-style loss")
    parser.add_argument("--iters", type=int, default=20 if on_gpu else 3)
    parser.add_argument("--warmup", type=int, default=5 if on_gpu else 1)
    parser.add_argument("--profile", metavar="FILE", help="also write a per-kernel time table of 2 steps to FILE")
    parser.add_argument("--opts", nargs="*", default=[], help="extra config overrides")
    args = parser.parse_args(argv)
    if args.release_baseline:
        args.amp, args.channels_last = ["off"], "off"
    layouts = {"on": [True], "off": [False], "both": [False, True]}[args.channels_last]
    for batch in args.batch:
        for amp in args.amp:
            for cl in layouts:
                print(json.dumps(run_setting(args, amp, cl, args.compile, batch)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
