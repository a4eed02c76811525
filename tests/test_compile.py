"""`trainer.compile` on the CPU: the compiled step matches the eager step, checkpoints keep
plain keys, and steps after the first reuse the graphs compiled on the first.

One eager and one compiled TrainState are built from the same seed and run the same
three train_steps (same batches, same mixing generator, same global RNG for dropout).
The first compile of the tiny toy model takes about a minute on two cores.
"""

from __future__ import annotations

import importlib
import math
import shutil
from pathlib import Path

import pytest
import torch

from s4mc import pseudo_label
from s4mc.config import load_config
from s4mc.distributed import DistInfo
from s4mc.errors import ConfigError
from s4mc.engine.loop import build_state
from s4mc.engine.step import train_step

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
SIZE = 32  # crop size in pixels; the batch is 2 labeled + 2 unlabeled images
BATCH = 2
# fp32 on both sides; inductor fuses and reorders reductions (BN statistics, convolution
# epilogues), so values differ from eager at the level of float rounding, not more.
LOSS_TOL = dict(rtol=1e-4, atol=1e-5)
PARAM_TOL = dict(rtol=1e-4, atol=1e-5)


def _compile_unavailable() -> str | None:
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    try:
        dynamo = importlib.import_module("torch._dynamo")
    except Exception as exc:  # pragma: no cover - depends on the platform
        return f"torch._dynamo cannot be imported: {exc}"
    if hasattr(dynamo, "is_dynamo_supported") and not dynamo.is_dynamo_supported():
        return "torch._dynamo does not support this Python/platform"
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("cc")):
        return "no C++ compiler on PATH: inductor cannot build CPU kernels for torch.compile"
    return None


_UNAVAILABLE = _compile_unavailable()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_UNAVAILABLE is not None, reason=str(_UNAVAILABLE)),
]


def _cfg(compile_: bool) -> dict:
    overrides = [
        f"trainer.compile={str(compile_).lower()}",
        f"dataset.batch_size={BATCH}",
        f"dataset.train.crop.size=[{SIZE}, {SIZE}]",
        "trainer.sup_only_epoch=0",
        "trainer.amp=off",
        "trainer.channels_last=false",
        "trainer.optimizer.fused=false",
        "net.sync_bn=false",
        "net.encoder.pretrained=null",
        "seed=0",
    ]
    return load_config(REPO / "experiments" / "toy" / "config.yaml", overrides)


def _batches(num_classes: int) -> list[tuple[dict, dict]]:
    """STEPS (labeled, unlabeled) pairs of random images with blocky labels."""
    g = torch.Generator().manual_seed(123)

    def one() -> dict:
        coarse = torch.randint(0, num_classes, (BATCH, 1, 4, 4), generator=g).float()
        label = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="nearest").long()[:, 0]
        return {"image": torch.randn(BATCH, 3, SIZE, SIZE, generator=g), "label": label}

    return [(one(), one()) for _ in range(STEPS)]


def _run(state, cfg, batches, after_step=None) -> list[float]:
    losses = []
    for i, (labeled, unlabeled) in enumerate(batches):
        torch.manual_seed(1000 + i)  # Dropout2d draws from the global RNG, in both runs alike
        metrics = train_step(state, [(labeled, unlabeled)], cfg)
        losses.append(metrics["loss"].item())
        if after_step is not None:
            after_step(i)
    return losses


def _float_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.dtype.is_floating_point}


@pytest.fixture(scope="module")
def eager_and_compiled():
    """Run both variants once; every check below reads these results."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    device = torch.device("cpu")
    cfg_eager, cfg_compiled = _cfg(False), _cfg(True)
    batches = _batches(cfg_eager["net"]["num_classes"])

    torch.manual_seed(0)
    eager = build_state(cfg_eager, DistInfo(device=device), iters_per_epoch=100)
    torch.manual_seed(0)
    compiled = build_state(cfg_compiled, DistInfo(device=device), iters_per_epoch=100)
    initial = (_float_state(eager.student), _float_state(compiled.student),
               eager.generator.get_state(), compiled.generator.get_state())

    eager_losses = _run(eager, cfg_eager, batches)

    graphs = {}

    def record(i):
        graphs[i] = (counters["stats"]["unique_graphs"], counters["frames"]["total"])

    # Dropout2d is active in train mode. fallback_random makes compiled dropout draw from the
    # same global generator, in the same order, as eager dropout, so both runs drop the same
    # channels and compare value for value. (Inductor's CPU lowering of bernoulli_ already
    # falls back to aten; the patch keeps the test exact should that change.)
    with inductor_config.patch(fallback_random=True):
        compiled_losses = _run(compiled, cfg_compiled, batches, after_step=record)
    yield {
        "eager": eager, "compiled": compiled, "initial": initial, "graphs": graphs,
        "eager_losses": eager_losses, "compiled_losses": compiled_losses,
    }
    torch._dynamo.reset()


def test_compiled_step_matches_eager_and_keeps_plain_modules(eager_and_compiled):
    r = eager_and_compiled
    eager, compiled = r["eager"], r["compiled"]

    # Same starting point: the comparison below is meaningful only from identical weights.
    s_eager, s_compiled, gen_eager, gen_compiled = r["initial"]
    assert s_eager.keys() == s_compiled.keys()
    for key in s_eager:
        assert torch.equal(s_eager[key], s_compiled[key]), key
    assert torch.equal(gen_eager, gen_compiled)

    # Checkpoints and evaluation use the plain modules: their keys carry no `_orig_mod.` prefix.
    for module in (compiled.student, compiled.teacher):
        keys = list(module.state_dict())
        assert keys and not any("_orig_mod" in k for k in keys), "checkpoint keys must stay plain"
    assert list(compiled.teacher.state_dict()) == list(eager.teacher.state_dict())
    # Only the compiled state carries compiled forwards, and the step runs through them.
    assert eager.student_forward is None and eager.teacher_forward is None
    assert compiled.student_forward is not None and compiled.teacher_forward is not None
    assert compiled.student_forward is not compiled.student
    assert compiled.teacher_forward is not compiled.teacher
    assert compiled.forwards() == (compiled.student_forward, compiled.teacher_forward)

    # The compiled forwards were really used: something was compiled.
    graphs = r["graphs"]
    assert graphs[0][0] > 0, "no graph was compiled: the step did not run the compiled forwards"

    # Per-step losses agree.
    assert all(math.isfinite(x) for x in r["eager_losses"] + r["compiled_losses"])
    torch.testing.assert_close(torch.tensor(r["compiled_losses"], dtype=torch.float64),
                               torch.tensor(r["eager_losses"], dtype=torch.float64), **LOSS_TOL)

    # Parameters and buffers (BN running statistics) after the steps agree, student and teacher.
    for plain_eager, plain_compiled in ((eager.student, compiled.student), (eager.teacher, compiled.teacher)):
        after_eager, after_compiled = _float_state(plain_eager), _float_state(plain_compiled)
        assert after_eager.keys() == after_compiled.keys()
        for key in after_eager:
            torch.testing.assert_close(after_compiled[key], after_eager[key], **PARAM_TOL, msg=lambda m, k=key: f"{k}: {m}")
    # ... and the weights did move, so the comparison is not of two untouched models.
    moved = _float_state(compiled.student)
    assert any(not torch.equal(moved[k], s_compiled[k]) for k in moved)


def test_no_recompilation_after_first_step(eager_and_compiled):
    """Step 1 compiles every graph (student; teacher in eval and train mode; the loss's indicator
    maps); later steps reuse them."""
    graphs = eager_and_compiled["graphs"]
    first, last = graphs[0], graphs[STEPS - 1]
    assert first[0] > 0
    assert last[0] == first[0], f"unique graphs grew from {first[0]} after step 1 to {last[0]} after step {STEPS}"
    assert last[1] == first[1], f"dynamo converted {last[1] - first[1]} new frames after step 1"


def test_compiled_indicator_maps_match_eager(eager_and_compiled):
    """The S4MC loss's dense part (softmax, margin, refinement) runs compiled under trainer.compile;
    its maps equal the eager ones to fp32 rounding, and the threshold built on them agrees."""
    compiled = eager_and_compiled["compiled"]
    assert eager_and_compiled["eager"].indicator_maps is None and compiled.indicator_maps is not None
    num_classes = _cfg(True)["net"]["num_classes"]
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(BATCH, num_classes, SIZE, SIZE, generator=g) * 3  # the step's shapes: no recompile
    args = ("margin", 4, 1, compiled.prior, True)
    raw_eager, refined_eager = pseudo_label.indicator_maps(logits, *args)
    raw_compiled, refined_compiled = compiled.indicator_maps(logits, *args)
    assert raw_compiled.dtype == refined_compiled.dtype == torch.float32
    torch.testing.assert_close(raw_compiled, raw_eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(refined_compiled, refined_eager, rtol=0, atol=1e-6)
    assert not torch.equal(refined_eager, raw_eager)  # refinement did something to compare


def test_compile_without_a_cpu_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("s4mc.engine.loop.shutil.which", lambda name: None)
    with pytest.raises(ConfigError, match="trainer.compile"):
        build_state(_cfg(True), DistInfo(device=torch.device("cpu")), iters_per_epoch=10)
