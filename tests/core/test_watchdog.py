"""A step that makes no progress is warned about (rank, coordinates, step, phase), and a stopped rank ends the
run once topology.collective_timeout_s passes, instead of 10 silent minutes.

The unit tests drive StallWatchdog directly (under a second each); the last test SIGSTOPs one rank of a real
2-rank `scaling train` and reads the other rank's warning, then the run's non-zero exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from scaling.core.topology import TopologyConfig
from scaling.core.trainer.watchdog import StallWatchdog

from .processes import SCALING, Started, rank_pids, tiny_run


def test_watchdog_warns_within_a_bound_when_heartbeats_stop() -> None:
    warnings: list[str] = []
    with StallWatchdog(0.3, "rank 1 (pp 0, dp 1, tp 0)", collective_timeout_s=600, warn=warnings.append):
        time.sleep(1.0)  # no beat for three times the warning time
    assert warnings, "no warning although no beat came for 1 s"
    first = warnings[0]
    assert "rank 1 (pp 0, dp 1, tp 0)" in first and "step 0, phase start" in first
    assert "topology.collective_timeout_s" in first and "600 s" in first


def test_watchdog_stays_silent_while_beats_come_and_names_the_phase_it_stalls_in() -> None:
    warnings: list[str] = []
    with StallWatchdog(0.4, "rank 0 (pp 1, dp 0, tp 0)", warn=warnings.append) as watchdog:
        for step in range(10):
            watchdog.beat("forward/backward", step)
            time.sleep(0.1)
        assert warnings == []
        watchdog.beat("optimizer", 10)
        deadline = time.monotonic() + 3
        while not warnings and time.monotonic() < deadline:
            time.sleep(0.05)
    assert warnings and "step 10, phase optimizer" in warnings[0] and "rank 0 (pp 1, dp 0, tp 0)" in warnings[0]


def test_collective_timeout_is_a_topology_field_with_a_default() -> None:
    assert TopologyConfig().collective_timeout_s == 600
    assert TopologyConfig(collective_timeout_s=5).collective_timeout_s == 5


@pytest.mark.timeout(240)
def test_a_stopped_rank_is_named_by_the_other_and_the_run_fails_after_the_collective_timeout(tmp_path: Path) -> None:
    config = tiny_run(tmp_path, stall_warning_s=1)
    run = Started(
        [str(SCALING), "train", str(config), "-o", "topology.collective_timeout_s=6"],
        env={"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "2"},  # the stopped rank ignores SIGTERM: SIGKILL comes after this
    )
    stopped = None
    try:
        run.wait_for("step 3/", 120)
        ranks = rank_pids(run.process.pid)
        assert set(ranks) == {0, 1}, run.output[-3000:]
        stopped = ranks[1]
        signal_sent = time.monotonic()
        os.kill(stopped, signal.SIGSTOP)
        warning = run.wait_for("has made no progress", 30)
        warned_after = time.monotonic() - signal_sent
        assert "rank 0 (pp 0, dp 0, tp 0)" in warning and "phase " in warning and "step " in warning, warning
        code = run.wait(timeout_s=60)
        exited_after = time.monotonic() - signal_sent
        assert code != 0, run.output[-3000:]
        assert warned_after < 6 < exited_after, (warned_after, exited_after)
        assert run.output.count("Traceback") <= 1, run.output[-3000:]
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)
        run.kill_all()
