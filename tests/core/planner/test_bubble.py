"""The timed pipeline run: closed-form bubbles where theory has one, peak in-flight micro-batches equal to
what the schedule checker counts, and the effect of message latency.

A wrong bubble points at the timing rules in ``pipeline_timeline`` (chunk durations, receive times); a
wrong ``peak_in_flight`` at its Forward/Backward accounting, since the schedules are the executor's own.
"""

from __future__ import annotations

import pytest

from scaling.core.pipeline.schedule import build_schedule
from scaling.core.pipeline.simulate import simulate
from scaling.core.planner import pipeline_timeline


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("n_micro", "pp"), [(1, 2), (4, 2), (8, 4), (3, 4), (16, 8)])
def test_gpipe_and_1f1b_bubble_is_textbook(schedule: str, n_micro: int, pp: int) -> None:
    timeline = pipeline_timeline(schedule, n_micro, pp, forward_s=1.0, backward_s=2.0)
    assert timeline.bubble_fraction == pytest.approx((pp - 1) / (n_micro + pp - 1), abs=1e-12)
    assert timeline.makespan_s == pytest.approx((n_micro + pp - 1) * 3.0)
    assert timeline.busy_s == pytest.approx([n_micro * 3.0] * pp)
    assert [b + i for b, i in zip(timeline.busy_s, timeline.idle_s, strict=True)] == pytest.approx(
        [timeline.makespan_s] * pp
    )


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved_1f1b"])
def test_one_stage_has_no_bubble(schedule: str) -> None:
    timeline = pipeline_timeline(schedule, 4, 1, 2 if schedule == "interleaved_1f1b" else 1, p2p_s=5.0)
    assert timeline.bubble_fraction == 0.0
    assert timeline.idle_s == [0.0]
    assert timeline.makespan_s == pytest.approx(12.0)


@pytest.mark.parametrize(("n_micro", "pp", "n_chunks"), [(8, 4, 2), (8, 4, 4), (16, 4, 2), (4, 2, 3)])
def test_interleaving_shrinks_the_bubble_by_the_number_of_chunks(n_micro: int, pp: int, n_chunks: int) -> None:
    """Megatron-LM's (pp-1)/(v m + pp-1): the simulation of this repository's interleaved schedule gives
    it exactly with instant messages (checked values: 8/4/2 -> 3/19, 8/4/4 -> 3/35), so the tolerance only
    absorbs float sums of chunk times."""
    plain = pipeline_timeline("1f1b", n_micro, pp)
    interleaved = pipeline_timeline("interleaved_1f1b", n_micro, pp, n_chunks)
    assert interleaved.bubble_fraction < plain.bubble_fraction
    assert interleaved.bubble_fraction == pytest.approx((pp - 1) / (n_chunks * n_micro + pp - 1), rel=1e-9)
    # idle time per rank is the plain schedule's divided by the number of chunks
    assert interleaved.bubble_s == pytest.approx(plain.bubble_s / n_chunks, rel=1e-9)


@pytest.mark.parametrize(("n_micro", "pp"), [(2, 4), (4, 4), (8, 4), (6, 3)])
def test_peak_in_flight(n_micro: int, pp: int) -> None:
    one_f_one_b = pipeline_timeline("1f1b", n_micro, pp).peak_in_flight
    assert one_f_one_b == [min(pp - stage, n_micro) for stage in range(pp)]
    assert pipeline_timeline("gpipe", n_micro, pp).peak_in_flight == [n_micro] * pp


@pytest.mark.parametrize(
    ("schedule", "n_micro", "pp", "n_chunks"),
    [("gpipe", 5, 3, 1), ("1f1b", 5, 3, 1), ("interleaved_1f1b", 8, 4, 2), ("interleaved_1f1b", 6, 3, 3)],
)
def test_peak_in_flight_matches_the_schedule_checker(schedule: str, n_micro: int, pp: int, n_chunks: int) -> None:
    schedules = [build_schedule(schedule, n_micro, pp, stage, n_chunks) for stage in range(pp)]
    expected = simulate(schedules, n_micro, n_chunks).peak_in_flight
    assert pipeline_timeline(schedule, n_micro, pp, n_chunks, p2p_s=0.3).peak_in_flight == expected


def test_message_latency_lengthens_the_critical_path() -> None:
    """GPipe with m=1 is a chain: 2 (pp-1) messages sit on the path from the first forward to the last
    backward; 1F1B in steady state hides them behind other work only partly, so it grows too."""
    assert pipeline_timeline("gpipe", 1, 4, p2p_s=0.5).makespan_s == pytest.approx(4 * 3.0 + 6 * 0.5)
    fast, slow = pipeline_timeline("1f1b", 8, 4), pipeline_timeline("1f1b", 8, 4, p2p_s=0.5)
    assert slow.makespan_s > fast.makespan_s
    assert slow.busy_s == fast.busy_s


def test_chunk_times_split_the_stage_time() -> None:
    timeline = pipeline_timeline("interleaved_1f1b", 4, 2, 2, forward_s=1.0, backward_s=3.0)
    assert timeline.busy_s == pytest.approx([16.0, 16.0])


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="multiple of"):
        pipeline_timeline("interleaved_1f1b", 6, 4, 2)
    with pytest.raises(ValueError, match="p2p_s"):
        pipeline_timeline("1f1b", 4, 2, p2p_s=-1.0)
    with pytest.raises(ValueError):
        pipeline_timeline("zigzag", 4, 2)
