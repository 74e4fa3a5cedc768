"""Where a training step's time goes: data, forward, backward, optimizer, and the waits on communication.

The pipeline executor calls ``module.instruction_hook(step, instruction)`` before every instruction; the
timer takes that call as the boundary between two phases, so the time from one instruction to the next
belongs to the first. Receives (``RecvActivation``, ``RecvGrad``) and the posting of sends block on the
neighbouring stage: that is the pipeline bubble plus exposed point-to-point time, ``pipeline_wait``.
``grad_sync`` is the time in ``module.grad_sync.finish()``: the data-parallel reductions still running
after the last backward (the overlapped part is hidden in backward, as it should be) and the
model-parallel sums. ``loss_sync`` is the rest of ``train_step`` around the schedule: the loss weighting
and the loss and metrics reduction, small collectives that also wait for the slowest rank.

The phases the trainer marks itself: ``data`` (waiting for the batch), ``optimizer`` and ``other`` (the
loop's bookkeeping after the update). The sum of all phases is the step's time.

Host timestamps mean nothing on CUDA unless the device has caught up, so a *timed* step synchronizes
at every boundary; the trainer times only the steps it will log (and, on CPU, where a timestamp costs
nothing, every step). Untimed steps pay one attribute check per instruction.

The hook chains: the one installed before (the hang watchdog's heartbeat) is called first, and put
back when the timer is detached.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from scaling.core.pipeline.schedule import Backward, Forward, Instruction

__all__ = ["COMMUNICATION_PHASES", "PHASES", "StepTimer"]

PHASES = ("data", "forward", "backward", "optimizer", "pipeline_wait", "grad_sync", "loss_sync", "other")
COMMUNICATION_PHASES = ("pipeline_wait", "grad_sync", "loss_sync")  # blocked on other ranks, not busy


def _phase_of(instruction: Instruction) -> str:
    if isinstance(instruction, Forward):
        return "forward"
    if isinstance(instruction, Backward):
        return "backward"
    # RecvActivation, RecvGrad block on the neighbour; SendActivation, SendGrad post the send (their
    # completion is waited for after the last instruction, inside the last instruction's phase)
    return "pipeline_wait"


class StepTimer:
    """Seconds per phase of one step; :meth:`attach` it to a ``ParallelModule`` for the schedule's phases."""

    def __init__(self, device: torch.device, *, time_every_step: bool | None = None) -> None:
        self.device = device
        self.sync = device.type == "cuda"
        # Without a device to wait for, a timestamp is all a boundary costs: time every step.
        self.time_every_step = not self.sync if time_every_step is None else time_every_step
        self.timing = False  # inside a timed step
        self._phase = "other"
        self._since = 0.0
        self._times: dict[str, float] = {}

    # Phases ----------------------------------------------------------------------------------------
    def start_step(self, timed: bool) -> bool:
        """Begin a step (in phase ``data``); ``timed``: the trainer will log it. Returns whether it is timed."""
        self.timing = timed or self.time_every_step
        if self.timing:
            self._times = dict.fromkeys(PHASES, 0.0)
            self._phase = "data"
            self._since = self._now()
        return self.timing

    def enter(self, phase: str) -> None:
        """End the current phase here and start ``phase`` (nothing on an untimed step)."""
        if not self.timing:
            return
        now = self._now()
        self._times[self._phase] += now - self._since
        self._phase, self._since = phase, now

    def stop_step(self) -> dict[str, float] | None:
        """End the step: seconds per phase (every name in :data:`PHASES`), or None when it was not timed."""
        if not self.timing:
            return None
        self.enter("other")
        self.timing = False
        return dict(self._times)

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # The module's hooks ----------------------------------------------------------------------------
    @contextmanager
    def attach(self, module: Any) -> Iterator[StepTimer]:
        """Time ``module``'s schedule while inside: chains its ``instruction_hook`` and wraps its
        ``grad_sync.finish``; both are restored on exit."""
        previous: Callable[[int, Instruction], None] | None = module.instruction_hook

        def on_instruction(step: int, instruction: Instruction) -> None:
            if previous is not None:
                previous(step, instruction)
            if self.timing:
                self.enter(_phase_of(instruction))

        grad_sync = module.grad_sync
        own_finish = grad_sync.__dict__.get("finish")  # an instance attribute someone set, else the method
        finish = grad_sync.finish

        def timed_finish() -> None:
            self.enter("grad_sync")
            finish()
            self.enter("loss_sync")

        module.instruction_hook = on_instruction
        setattr(grad_sync, "finish", timed_finish)  # noqa: B010  (an instance attribute over the method)
        try:
            yield self
        finally:
            module.instruction_hook = previous
            if own_finish is None:
                delattr(grad_sync, "finish")
            else:
                setattr(grad_sync, "finish", own_finish)  # noqa: B010
