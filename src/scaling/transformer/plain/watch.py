"""Hang forensics for the plain loop: the model beats a heartbeat in forward, backward and the optimizer step.

The trainer's loop beats its own heartbeat; a plain loop (``loss = model(batch); loss.backward();
optimizer.step()``) has no loop of ours to beat it. The model is what every step passes through, so it does:
``forward`` beats "forward", the start of ``backward`` (a hook on the loss) beats "backward", and every
``torch.optim`` optimizer's ``step`` beats "optimizer step" (a global step pre-hook, so any optimizer the
user built counts). Collectives issued from Python (FSDP2's) count as progress on their own, as in the
trainer. When no rank progresses for the timeout, every rank writes its stacks and last collectives to
``hang_dir/rank_N.txt`` and the job exits naming the rank(s) that did not arrive
(:mod:`scaling.core.trainer.hang`).

Opt-in: ``hang_timeout_s=`` on the model, or ``SCALING_HANG_TIMEOUT_S`` in the environment. A loop whose
ranks legitimately wait longer than the timeout without a step (rank 0 alone evaluating while the others
wait in a barrier) must stop the watchdog first (``model.stop_hang_watchdog()``). One watchdog per
process: a second model reuses the first one's.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook

from scaling.core.topology import Topology
from scaling.core.trainer.hang import HangWatchdog
from scaling.core.trainer.heartbeat import Heartbeat

__all__ = ["HANG_TIMEOUT_ENV", "PlainLoopWatch", "hang_timeout"]

HANG_TIMEOUT_ENV = "SCALING_HANG_TIMEOUT_S"

_current: PlainLoopWatch | None = None


def hang_timeout(value: float | None) -> float | None:
    """The watchdog's timeout: ``value``, else ``SCALING_HANG_TIMEOUT_S``, else None (no watchdog)."""
    where = "hang_timeout_s"
    if value is None:
        raw = os.environ.get(HANG_TIMEOUT_ENV, "").strip()
        if not raw:
            return None
        where = HANG_TIMEOUT_ENV
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{where}={raw!r}: expected a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{where}={value}: expected a positive number of seconds")
    return float(value)


class PlainLoopWatch:
    """This process's heartbeat and hang watchdog for a plain loop; see the module docstring."""

    def __init__(self, timeout_s: float, dump_dir: Path, topology: Topology) -> None:
        where = f"rank {topology.global_rank} (dp {topology.dp_rank}, tp {topology.tp_rank})"
        self.heartbeat = Heartbeat(where)
        self.step = 0
        self._dog: HangWatchdog | None = HangWatchdog.for_world(
            self.heartbeat, timeout_s, dump_dir, slow_timeout_s=topology.config.collective_timeout_s
        ).start()
        self._hook = register_optimizer_step_pre_hook(self._before_optimizer_step)
        atexit.register(self.stop)

    @classmethod
    def for_process(cls, timeout_s: float, dump_dir: Path, topology: Topology) -> PlainLoopWatch:
        """The process's watch: started on first use (collective-free; needs the default process group)."""
        global _current
        if _current is None or _current._dog is None:
            if not dist.is_initialized():
                raise RuntimeError("the hang watchdog needs an initialised process group")
            _current = cls(timeout_s, dump_dir, topology)
        return _current

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.heartbeat.beat("optimizer step", self.step)

    def forward(self, step: int) -> None:
        """Forward of call ``step`` starts (its first all-gather may be where it waits)."""
        self.step = step
        self.heartbeat.beat("forward", step)

    def backward_of(self, loss: torch.Tensor) -> None:
        """``loss`` beats "backward" when its backward starts."""
        if loss.requires_grad:
            loss.register_hook(self._backward_started)  # type: ignore[no-untyped-call]

    def _backward_started(self, grad: torch.Tensor) -> None:
        self.heartbeat.beat("backward", self.step)

    @contextmanager
    def saving(self) -> Iterator[None]:
        """Within: a save, which may take long without collectives (files, checksums)."""
        self.heartbeat.beat("save", self.step, slow=True)
        try:
            yield
        finally:
            self.heartbeat.beat("after save", self.step)

    def stop(self) -> None:
        """Stop watching (idempotent): the loop is over, or is about to wait longer than the timeout."""
        if self._dog is None:
            return
        self._dog.stop()
        self._dog = None
        self._hook.remove()
