"""SIGINT/SIGTERM end a run at an iteration boundary, with a checkpoint that resumes exactly.

A signal only sets a flag. The loop asks `StopRequest.agreed()` at every iteration boundary;
with several processes the ranks agree through a small all-reduce that is read one boundary
later, so the step never waits on it and every rank stops after the same iteration even when
the signal reaches them at different moments (a terminal's Ctrl-C, torchrun forwarding it,
a scheduler's SIGTERM).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as torch_dist

from s4mc.errors import S4MCError

# Launchers repeat a signal (torchrun forwards Ctrl-C, then sends SIGTERM); within this many
# seconds a repeat is the same request. A later second Ctrl-C leaves at once, saving nothing.
REPEAT_WINDOW_S = 5.0


class TrainingInterrupted(S4MCError):
    """The run stopped on SIGINT/SIGTERM after saving latest.pth at an iteration boundary."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def announce_pending_stop(signum: int) -> None:
    """Say at once, from rank 0, that a stop is pending: the current step (and, under torchrun,
    the other ranks) must finish before latest.pth is written, which can take a while.
    os.write, not logging: this runs in a signal handler, which may interrupt a logging call."""
    if os.environ.get("RANK", "0") != "0":
        return
    name = signal.Signals(signum).name
    os.write(2, (f"\n{name}: stop pending; finishing the current iteration, then saving latest.pth "
                 f"(another Ctrl-C more than {REPEAT_WINDOW_S:.0f} s later leaves at once, saving nothing)\n").encode())


def interrupted_message(text: str) -> str:
    """The closing message of a stopped run; under torchrun, a note on the traceback torchrun
    prints after it (its own report of the signal, which the code here cannot suppress)."""
    if under_torchrun():
        text += (" torchrun prints its own SignalException traceback after this: that is its report of the "
                 "signal, not an error of the run.")
    return text


class StopRequest:
    def __init__(self, device: torch.device, distributed: bool):
        self.device = device
        self.distributed = distributed
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict = {}
        self._pending = None

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending[0].wait()
            except Exception:  # noqa: BLE001 - the run is ending anyway; keep its own error
                pass

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            announce_pending_stop(signum)
        elif signum == signal.SIGINT and now - self._first_at > REPEAT_WINDOW_S:
            raise KeyboardInterrupt  # a deliberate second Ctrl-C: stop now, without saving

    def agreed(self) -> bool:
        """True when this boundary is where every rank stops."""
        if not self.distributed:
            return self.signum is not None
        flag = torch.tensor([0 if self.signum is None else 1], device=self.device)
        work = torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX, async_op=True)
        previous, self._pending = self._pending, (work, flag)
        if previous is None:
            return False
        previous[0].wait()
        return bool(previous[1].item())

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal"
