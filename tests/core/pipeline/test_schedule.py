"""Schedules are checked in one process: all stages simulated together must pair, order and finish."""

from __future__ import annotations

import pytest

from scaling.core.pipeline.schedule import (
    Backward,
    Forward,
    RecvActivation,
    RecvGrad,
    SendActivation,
    SendGrad,
    build_schedule,
    forward_only,
    gpipe,
    interleaved_one_f_one_b,
    one_f_one_b,
)
from scaling.core.pipeline.simulate import ScheduleError, simulate

CASES = [(kind, m, pp, 1) for kind in ("gpipe", "1f1b") for pp in (1, 2, 3, 4) for m in (1, 2, 3, 4, 8)] + [
    ("interleaved_1f1b", m, pp, v) for pp in (1, 2, 4) for v in (1, 2, 3) for m in (pp, 2 * pp, 4 * pp)
]


@pytest.mark.parametrize(("kind", "n_micro", "pp", "n_chunks"), CASES)
def test_every_schedule_pairs_orders_and_finishes(kind: str, n_micro: int, pp: int, n_chunks: int) -> None:
    schedules = [build_schedule(kind, n_micro, pp, stage, n_chunks) for stage in range(pp)]
    simulate(schedules, n_micro, n_chunks)  # raises on deadlock, mis-ordering, missing or repeated work


@pytest.mark.parametrize(("n_micro", "pp", "n_chunks"), [(1, 1, 1), (4, 2, 1), (3, 4, 1), (4, 2, 2), (8, 4, 3)])
def test_forward_only_schedules_finish(n_micro: int, pp: int, n_chunks: int) -> None:
    schedules = [forward_only(n_micro, pp, stage, n_chunks) for stage in range(pp)]
    simulate(schedules, n_micro, n_chunks, backward=False)
    assert not any(isinstance(i, Backward | RecvGrad | SendGrad) for s in schedules for i in s)


def test_one_f_one_b_for_two_stages_exactly() -> None:
    assert one_f_one_b(3, 2, 0) == [
        Forward(0), SendActivation(0),
        Forward(1), SendActivation(1), RecvGrad(0), Backward(0),
        Forward(2), SendActivation(2), RecvGrad(1), Backward(1),
        RecvGrad(2), Backward(2),
    ]  # fmt: skip
    assert one_f_one_b(3, 2, 1) == [
        RecvActivation(0), Forward(0), Backward(0), SendGrad(0),
        RecvActivation(1), Forward(1), Backward(1), SendGrad(1),
        RecvActivation(2), Forward(2), Backward(2), SendGrad(2),
    ]  # fmt: skip


def test_one_f_one_b_bounds_live_activations_and_gpipe_does_not() -> None:
    pp, n_micro = 4, 8
    bounded = simulate([one_f_one_b(n_micro, pp, s) for s in range(pp)], n_micro)
    assert bounded.peak_in_flight == [4, 3, 2, 1]
    unbounded = simulate([gpipe(n_micro, pp, s) for s in range(pp)], n_micro)
    assert unbounded.peak_in_flight == [8, 8, 8, 8]


def test_interleaved_visits_chunks_in_groups_of_pp() -> None:
    forwards = [(i.micro, i.chunk) for i in interleaved_one_f_one_b(4, 2, 0, 2) if isinstance(i, Forward)]
    assert forwards == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1)]
    backwards = [(i.micro, i.chunk) for i in interleaved_one_f_one_b(4, 2, 0, 2) if isinstance(i, Backward)]
    assert backwards == [(0, 1), (1, 1), (0, 0), (1, 0), (2, 1), (3, 1), (2, 0), (3, 0)]


def test_simulator_catches_broken_schedules() -> None:
    good = [one_f_one_b(2, 2, s) for s in range(2)]
    with pytest.raises(ScheduleError, match="deadlock"):
        # stage 0 waits for a gradient before sending the activation stage 1 needs
        simulate([[Forward(0), RecvGrad(0), SendActivation(0), Backward(0)], good[1][:4]], 1)
    swapped = list(good[1])
    swapped[0], swapped[4] = swapped[4], swapped[0]  # receive micro-batch 1 before 0
    with pytest.raises(ScheduleError, match="delivers"):
        simulate([good[0], swapped], 2)
    with pytest.raises(ScheduleError, match="exactly one forward and backward"):
        simulate([gpipe(2, 1, 0)], 3)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="multiple of pipe_parallel_size"):
        interleaved_one_f_one_b(3, 2, 0, 2)
    with pytest.raises(ValueError, match="one model chunk per rank"):
        build_schedule("1f1b", 4, 2, 0, n_chunks=2)
    with pytest.raises(ValueError, match="invalid schedule arguments"):
        gpipe(0, 2, 0)
