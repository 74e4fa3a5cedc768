"""How long a pipeline schedule keeps each stage idle: a timed run of the schedules the executor runs.

:func:`scaling.core.pipeline.simulate.simulate` proves the instruction lists safe; this module gives the same
lists durations and plays them out, so the bubble comes from the schedule's own instructions rather than a
closed formula that may not describe it (the interleaved schedule's warm-up, for one, is not the textbook
one). Every rank runs its list in order with its own clock:

* ``Forward`` / ``Backward`` of one chunk take ``forward_s / n_chunks`` / ``backward_s / n_chunks``:
  ``forward_s`` and ``backward_s`` are one micro-batch's times for the whole stage, which the interleaved
  schedule splits into ``n_chunks`` model chunks;
* a send stamps its message with the sender's clock and never blocks (the executor keeps the handle);
* a receive completes at ``max(own clock, send time + p2p_s)``; with ``pp == 1`` the interleaved chunks
  hand activations over in memory (the executor's local mailbox), without ``p2p_s``.

Messages carry their send time, so the result does not depend on the order in which the loop visits the
ranks: it is the event-driven timeline, computed in one pass over the instructions. Links are not
contended (a stage sends at most one activation and one gradient at a time, on separate channels).

``bubble_fraction`` is the mean over ranks of ``idle / makespan``. Every rank does the same work, so this
is also ``1 - busy / makespan``: the share of the step the pipeline's stages spend waiting (at the start,
in between and for the last stage to drain), the figure Megatron-LM and GPipe quote as the bubble.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass

from scaling.core.pipeline.schedule import (
    Backward,
    Forward,
    Instruction,
    RecvActivation,
    RecvGrad,
    ScheduleType,
    SendActivation,
    SendGrad,
    build_schedule,
)
from scaling.core.pipeline.simulate import ScheduleError

__all__ = ["PipelineTimeline", "pipeline_timeline"]


@dataclass(frozen=True)
class PipelineTimeline:
    """One optimizer step's forward and backward passes on every pipeline rank (lists are per rank)."""

    makespan_s: float  # first forward starts at 0; the last backward anywhere ends here
    busy_s: list[float]  # time spent computing
    idle_s: list[float]  # makespan - busy: waiting for inputs, or done before the others
    bubble_fraction: float  # mean over ranks of idle / makespan
    peak_in_flight: list[int]  # most micro-batch chunks whose activations were alive at once

    @property
    def bubble_s(self) -> float:
        """Mean idle time per rank: what the pipeline adds to a step over its compute."""
        return sum(self.idle_s) / len(self.idle_s)


def pipeline_timeline(
    schedule: ScheduleType | str,
    n_micro: int,
    pp: int,
    n_chunks: int = 1,
    *,
    forward_s: float = 1.0,
    backward_s: float = 2.0,
    p2p_s: float = 0.0,
) -> PipelineTimeline:
    """Play out ``schedule`` on ``pp`` stages with the durations above (see the module docstring).

    Raises ``ValueError`` for arguments the schedule rejects or negative times, and
    :class:`~scaling.core.pipeline.simulate.ScheduleError` if the schedules do not pair up.
    """
    if min(forward_s, backward_s, p2p_s) < 0:
        raise ValueError(f"times must be >= 0: forward_s={forward_s}, backward_s={backward_s}, p2p_s={p2p_s}")
    kind = ScheduleType(schedule).value
    if forward_s > 0:  # the timeline scales with its times: play it once per ratio (a planner asks for hundreds)
        unit = _unit_timeline(kind, n_micro, pp, n_chunks, backward_s / forward_s, p2p_s / forward_s)
        return PipelineTimeline(
            makespan_s=unit.makespan_s * forward_s,
            busy_s=[b * forward_s for b in unit.busy_s],
            idle_s=[i * forward_s for i in unit.idle_s],
            bubble_fraction=unit.bubble_fraction,
            peak_in_flight=list(unit.peak_in_flight),
        )
    return _play(kind, n_micro, pp, n_chunks, forward_s, backward_s, p2p_s)


@functools.lru_cache(maxsize=4096)
def _unit_timeline(
    schedule: str, n_micro: int, pp: int, n_chunks: int, backward_s: float, p2p_s: float
) -> PipelineTimeline:
    return _play(schedule, n_micro, pp, n_chunks, 1.0, backward_s, p2p_s)


@functools.cache
def _schedules(schedule: str, n_micro: int, pp: int, n_chunks: int) -> tuple[tuple[Instruction, ...], ...]:
    return tuple(tuple(build_schedule(schedule, n_micro, pp, stage, n_chunks)) for stage in range(pp))


def _play(
    schedule: str, n_micro: int, pp: int, n_chunks: int, forward_s: float, backward_s: float, p2p_s: float
) -> PipelineTimeline:
    schedules = _schedules(schedule, n_micro, pp, n_chunks)
    chunk_forward, chunk_backward = forward_s / n_chunks, backward_s / n_chunks
    # (kind, sender, receiver) -> FIFO of (micro, chunk on the receiver, send time)
    channels: dict[tuple[str, int, int], deque[tuple[int, int, float]]] = {}
    clock, busy = [0.0] * pp, [0.0] * pp
    position, in_flight, peak = [0] * pp, [0] * pp, [0] * pp

    def step(rank: int, instr: Instruction) -> bool:
        """Run one instruction on ``rank``; False when it is a receive whose message is not sent yet."""
        match instr:
            case SendActivation() | SendGrad():
                forward = isinstance(instr, SendActivation)
                target = instr.chunk * pp + rank + (1 if forward else -1)  # the receiver's virtual stage
                key = ("act" if forward else "grad", rank, target % pp)
                channels.setdefault(key, deque()).append((instr.micro, target // pp, clock[rank]))
            case RecvActivation() | RecvGrad():
                forward = isinstance(instr, RecvActivation)
                src = (instr.chunk * pp + rank + (-1 if forward else 1)) % pp
                queue = channels.get(("act" if forward else "grad", src, rank))
                if not queue:
                    return False
                micro, chunk, sent = queue.popleft()
                if (micro, chunk) != (instr.micro, instr.chunk):
                    raise ScheduleError(f"stage {rank} {instr}: channel from stage {src} delivers {(micro, chunk)}")
                # with one stage, the chunks pass activations through a local mailbox, not the network
                clock[rank] = max(clock[rank], sent + (p2p_s if src != rank else 0.0))
            case Forward():
                clock[rank] += chunk_forward
                busy[rank] += chunk_forward
                in_flight[rank] += 1
                peak[rank] = max(peak[rank], in_flight[rank])
            case Backward():
                clock[rank] += chunk_backward
                busy[rank] += chunk_backward
                in_flight[rank] -= 1
        return True

    while any(position[r] < len(schedules[r]) for r in range(pp)):
        progressed = False
        for rank in range(pp):
            while position[rank] < len(schedules[rank]) and step(rank, schedules[rank][position[rank]]):
                position[rank] += 1
                progressed = True
        if not progressed:
            raise ScheduleError(f"deadlock at positions {position} of schedule {schedule!r}")
    makespan = max(clock)
    idle = [makespan - b for b in busy]
    fraction = sum(i / makespan for i in idle) / pp if makespan > 0 else 0.0
    return PipelineTimeline(
        makespan_s=makespan, busy_s=busy, idle_s=idle, bubble_fraction=fraction, peak_in_flight=peak
    )
