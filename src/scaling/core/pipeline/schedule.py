"""Pipeline schedules as data: a pure function of ints returns the instruction list of one stage.

The executor in :mod:`scaling.core.pipeline.module` runs the list with ``match``; it is the only code that
does point-to-point communication. Because schedules are plain data, every schedule is checked in one
process by :func:`scaling.core.pipeline.simulate.simulate` (sends and receives pair up in order, nothing
deadlocks, each micro-batch gets one forward and one backward per model chunk).

Conventions:

* ``micro`` is the micro-batch index, ``chunk`` the model chunk on this rank (always 0 unless
  interleaved); the virtual stage of ``chunk`` on pipeline rank ``stage`` is ``chunk * pp + stage``.
* A receive comes right before the compute that needs it and a send right after the compute that
  produced it. Sends never block (the executor keeps the handle), receives do.
* Activations and gradients travel on separate channels (separate process groups), so each channel
  carries messages in one fixed order and no tags are needed (NCCL ignores them).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = [
    "Backward",
    "Forward",
    "Instruction",
    "RecvActivation",
    "RecvGrad",
    "ScheduleType",
    "SendActivation",
    "SendGrad",
    "build_schedule",
    "forward_only",
    "gpipe",
    "interleaved_one_f_one_b",
    "one_f_one_b",
]


class ScheduleType(str, Enum):
    GPIPE = "gpipe"  # all forwards, then all backwards: simplest, most activation memory
    ONE_F_ONE_B = "1f1b"  # at most pp micro-batches in flight per stage
    INTERLEAVED_1F1B = "interleaved_1f1b"  # several model chunks per rank: smaller bubble, more messages


@dataclass(frozen=True, slots=True)
class Forward:
    micro: int
    chunk: int = 0


@dataclass(frozen=True, slots=True)
class Backward:
    micro: int
    chunk: int = 0


@dataclass(frozen=True, slots=True)
class RecvActivation:
    micro: int
    chunk: int = 0


@dataclass(frozen=True, slots=True)
class SendActivation:
    micro: int
    chunk: int = 0


@dataclass(frozen=True, slots=True)
class RecvGrad:
    micro: int
    chunk: int = 0


@dataclass(frozen=True, slots=True)
class SendGrad:
    micro: int
    chunk: int = 0


Instruction = Forward | Backward | RecvActivation | SendActivation | RecvGrad | SendGrad


def _with_comm(compute: list[tuple[str, int, int]], pp: int, stage: int, n_chunks: int) -> list[Instruction]:
    """Surround each compute step ("F"/"B", micro, chunk) with the receives and sends it needs."""
    n_virtual = pp * n_chunks
    out: list[Instruction] = []
    for kind, micro, chunk in compute:
        virtual = chunk * pp + stage
        if kind == "F":
            if virtual > 0:
                out.append(RecvActivation(micro, chunk))
            out.append(Forward(micro, chunk))
            if virtual < n_virtual - 1:
                out.append(SendActivation(micro, chunk))
        else:
            if virtual < n_virtual - 1:
                out.append(RecvGrad(micro, chunk))
            out.append(Backward(micro, chunk))
            if virtual > 0:
                out.append(SendGrad(micro, chunk))
    return out


def _check(n_micro: int, pp: int, stage: int) -> None:
    if n_micro < 1 or pp < 1 or not 0 <= stage < pp:
        raise ValueError(f"invalid schedule arguments: n_micro={n_micro}, pp={pp}, stage={stage}")


def gpipe(n_micro: int, pp: int, stage: int) -> list[Instruction]:
    """All forwards, then all backwards (in reverse order, so the last activations are freed first)."""
    _check(n_micro, pp, stage)
    compute = [("F", m, 0) for m in range(n_micro)] + [("B", m, 0) for m in reversed(range(n_micro))]
    return _with_comm(compute, pp, stage, 1)


def one_f_one_b(n_micro: int, pp: int, stage: int) -> list[Instruction]:
    """Warm up with ``pp - stage - 1`` forwards, then alternate one forward and one backward, then drain.

    Stage ``s`` keeps at most ``pp - s`` micro-batches of activations alive, whatever ``n_micro`` is.
    """
    _check(n_micro, pp, stage)
    warmup = min(pp - stage - 1, n_micro)
    compute: list[tuple[str, int, int]] = [("F", m, 0) for m in range(warmup)]
    next_backward = 0
    for micro in range(warmup, n_micro):
        compute.append(("F", micro, 0))
        compute.append(("B", next_backward, 0))
        next_backward += 1
    compute += [("B", m, 0) for m in range(next_backward, n_micro)]
    return _with_comm(compute, pp, stage, 1)


def _interleaved_order(k: int, pp: int, n_chunks: int, backward: bool) -> tuple[int, int]:
    """(micro, chunk) of the k-th forward (or backward) on any rank.

    Micro-batches go through the chunks in groups of ``pp``: forwards of micro-batches 0..pp-1 on chunk 0,
    then the same micro-batches on chunk 1, and so on; backwards visit the chunks in reverse.
    """
    group = k // (pp * n_chunks)
    chunk = (k // pp) % n_chunks
    if backward:
        chunk = n_chunks - 1 - chunk
    return group * pp + k % pp, chunk


def interleaved_one_f_one_b(n_micro: int, pp: int, stage: int, n_chunks: int) -> list[Instruction]:
    """1F1B over ``n_chunks`` model chunks per rank (virtual stages), shrinking the bubble by ``n_chunks``.

    Requires ``n_micro`` to be a multiple of ``pp`` so the groups of ``pp`` micro-batches line up.
    """
    _check(n_micro, pp, stage)
    if n_chunks < 1:
        raise ValueError(f"n_chunks must be >= 1, got {n_chunks}")
    if n_micro % pp != 0:
        raise ValueError(
            f"the interleaved schedule needs the number of micro-batches ({n_micro}) to be a multiple of "
            f"pipe_parallel_size ({pp})"
        )
    total = n_micro * n_chunks
    warmup = min((pp - stage - 1) * 2 + (n_chunks - 1) * pp, total)
    compute: list[tuple[str, int, int]] = [("F", *_interleaved_order(k, pp, n_chunks, False)) for k in range(warmup)]
    backward = 0
    for forward in range(warmup, total):
        compute.append(("F", *_interleaved_order(forward, pp, n_chunks, False)))
        compute.append(("B", *_interleaved_order(backward, pp, n_chunks, True)))
        backward += 1
    compute += [("B", *_interleaved_order(k, pp, n_chunks, True)) for k in range(backward, total)]
    return _with_comm(compute, pp, stage, n_chunks)


def forward_only(n_micro: int, pp: int, stage: int, n_chunks: int = 1) -> list[Instruction]:
    """Forwards of every micro-batch and chunk (evaluation), in the interleaved order when chunked."""
    _check(n_micro, pp, stage)
    if n_chunks == 1:
        order = [(m, 0) for m in range(n_micro)]
    else:
        order = [_interleaved_order(k, pp, n_chunks, False) for k in range(n_micro * n_chunks)]
    return _with_comm([("F", m, c) for m, c in order], pp, stage, n_chunks)


def build_schedule(
    schedule: ScheduleType | str, n_micro: int, pp: int, stage: int, n_chunks: int = 1
) -> list[Instruction]:
    """The instruction list of ``stage`` for the schedule named in the config."""
    kind = ScheduleType(schedule)
    if kind is not ScheduleType.INTERLEAVED_1F1B and n_chunks != 1:
        raise ValueError(f"schedule {kind.value!r} runs one model chunk per rank, got n_chunks={n_chunks}")
    if kind is ScheduleType.GPIPE:
        return gpipe(n_micro, pp, stage)
    if kind is ScheduleType.ONE_F_ONE_B:
        return one_f_one_b(n_micro, pp, stage)
    return interleaved_one_f_one_b(n_micro, pp, stage, n_chunks)
