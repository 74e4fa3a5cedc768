"""Run the schedules of all stages together in one process, without tensors, to prove them safe.

Each rank executes its instruction list in order. A send appends to the FIFO of its channel (sender,
receiver, activation or gradient) and never blocks; a receive blocks until its channel has a message and
then must find exactly the (micro, chunk) it expects at the head. The simulation fails when no rank can
move (deadlock), when a receive would get another message than it expects (out-of-order pairing), when
a compute step runs without its input, or when a micro-batch does not get exactly one forward and one
backward per model chunk.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from scaling.core.pipeline.schedule import (
    Backward,
    Forward,
    Instruction,
    RecvActivation,
    RecvGrad,
    SendActivation,
    SendGrad,
)

__all__ = ["ScheduleError", "SimulationResult", "simulate"]


class ScheduleError(AssertionError):
    """The schedules are unsafe; the message says which rank and instruction."""


@dataclass(frozen=True)
class SimulationResult:
    rounds: int  # synchronous rounds until done: a rough measure of the critical path
    peak_in_flight: list[int]  # per rank, the most micro-batch chunks whose activations were alive at once


def _neighbour(stage: int, chunk: int, pp: int, step: int) -> tuple[int, int]:
    """(rank, chunk) of the virtual stage ``step`` away (+1 next, -1 previous)."""
    virtual = chunk * pp + stage + step
    return virtual % pp, virtual // pp


def simulate(
    schedules: list[list[Instruction]], n_micro: int, n_chunks: int = 1, *, backward: bool = True
) -> SimulationResult:
    pp = len(schedules)
    n_virtual = pp * n_chunks
    channels: dict[tuple[str, int, int], deque[tuple[int, int]]] = {}
    position = [0] * pp
    have_input: list[set[tuple[int, int]]] = [set() for _ in range(pp)]
    have_grad: list[set[tuple[int, int]]] = [set() for _ in range(pp)]
    forwarded: list[set[tuple[int, int]]] = [set() for _ in range(pp)]
    backwarded: list[set[tuple[int, int]]] = [set() for _ in range(pp)]
    in_flight, peak = [0] * pp, [0] * pp
    rounds = 0

    def fail(rank: int, instr: Instruction, why: str) -> ScheduleError:
        return ScheduleError(f"stage {rank}, instruction {position[rank]} {instr}: {why}")

    while any(position[r] < len(schedules[r]) for r in range(pp)):
        rounds += 1
        progressed = False
        for rank in range(pp):
            while position[rank] < len(schedules[rank]):
                instr = schedules[rank][position[rank]]
                key = (instr.micro, instr.chunk)
                virtual = instr.chunk * pp + rank
                match instr:
                    case SendActivation():
                        dst, dst_chunk = _neighbour(rank, instr.chunk, pp, +1)
                        channels.setdefault(("act", rank, dst), deque()).append((instr.micro, dst_chunk))
                    case SendGrad():
                        dst, dst_chunk = _neighbour(rank, instr.chunk, pp, -1)
                        channels.setdefault(("grad", rank, dst), deque()).append((instr.micro, dst_chunk))
                    case RecvActivation() | RecvGrad():
                        is_act = isinstance(instr, RecvActivation)
                        src, _ = _neighbour(rank, instr.chunk, pp, -1 if is_act else +1)
                        queue = channels.get(("act" if is_act else "grad", src, rank))
                        if not queue:
                            break  # blocked: try the other ranks
                        if queue[0] != key:
                            raise fail(rank, instr, f"channel from stage {src} delivers {queue[0]} first")
                        queue.popleft()
                        (have_input if is_act else have_grad)[rank].add(key)
                    case Forward():
                        if virtual > 0 and key not in have_input[rank]:
                            raise fail(rank, instr, "forward without its received activation")
                        if key in forwarded[rank]:
                            raise fail(rank, instr, "second forward of the same micro-batch")
                        forwarded[rank].add(key)
                        in_flight[rank] += 1
                        peak[rank] = max(peak[rank], in_flight[rank])
                    case Backward():
                        if key not in forwarded[rank]:
                            raise fail(rank, instr, "backward before forward")
                        if virtual < n_virtual - 1 and key not in have_grad[rank]:
                            raise fail(rank, instr, "backward without its received gradient")
                        if key in backwarded[rank]:
                            raise fail(rank, instr, "second backward of the same micro-batch")
                        backwarded[rank].add(key)
                        in_flight[rank] -= 1
                position[rank] += 1
                progressed = True
        if not progressed:
            stuck = {r: schedules[r][position[r]] for r in range(pp) if position[r] < len(schedules[r])}
            raise ScheduleError(f"deadlock: every unfinished stage waits on a receive: {stuck}")
    expected = {(m, c) for m in range(n_micro) for c in range(n_chunks)}
    for rank in range(pp):
        if forwarded[rank] != expected or backwarded[rank] != (expected if backward else set()):
            raise ScheduleError(f"stage {rank} did not run exactly one forward and backward per micro-batch chunk")
    leftovers = {k: list(q) for k, q in channels.items() if q}
    if leftovers:
        raise ScheduleError(f"messages sent but never received: {leftovers}")
    return SimulationResult(rounds=rounds, peak_in_flight=peak)
