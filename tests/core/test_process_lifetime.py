"""One job, one lifetime: `scaling train`'s workers stop when it is signalled or killed, and a graceful stop
saves, says so in one line and exits 0.

Real processes throughout (launcher -> agent/torchrun -> 2 ranks); every wait is bounded and whatever is
left is killed at the end. A failure here means workers were left training (the launcher does not pass the
signal on, or a worker does not die with its parent: see scaling.core.runner.lifetime).
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest
import yaml

from scaling.core.runner.lifetime import die_with_parent

from .processes import SCALING, Started, descendants, rank_pids, tiny_run, wait_gone

_START_S = 120  # start-up of 3 Python processes importing torch on a loaded 2-core machine


def _training(tmp_path: Path) -> tuple[Started, list[int]]:
    run = Started([str(SCALING), "train", str(tiny_run(tmp_path))])
    run.wait_for("step 3/", _START_S)
    started = descendants(run.process.pid)
    assert len(rank_pids(run.process.pid)) == 2, run.output[-3000:]
    return run, started


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])  # SIGINT: Ctrl-C
def test_signal_to_scaling_train_stops_every_worker_after_a_save_in_one_line_and_exit_0(
    tmp_path: Path, sig: signal.Signals
) -> None:
    run, workers = _training(tmp_path)
    try:
        run.process.send_signal(sig)
        code = run.wait(timeout_s=60)
        assert wait_gone(workers, timeout_s=10) == [], run.output[-3000:]
        assert code == 0, run.output[-3000:]
        stops = [line for line in run.lines if line.startswith("stopped at step")]
        assert len(stops) == 1 and f"on {sig.name}; checkpoint saved to" in stops[0], run.output[-3000:]
        assert "Traceback" not in run.output and "SignalException" not in run.output
        assert not [line for line in run.lines if "WARNING" in line], run.output[-3000:]  # one line, not one per rank
        step = int(stops[0].split()[3].rstrip(";"))
        assert (tmp_path / "ckpt" / "latest").read_text() == f"global_step{step}"
    finally:
        run.kill_all()


@pytest.mark.timeout(240)
def test_kill_9_of_scaling_train_never_leaves_workers_training(tmp_path: Path) -> None:
    """The launcher cannot pass on a SIGKILL: its children die with it (parent-death signal), and the
    workers, getting SIGTERM that way, stop after their step (they may save it: a finished step is valid)."""
    run, started = _training(tmp_path)
    try:
        run.process.kill()
        assert wait_gone(started, timeout_s=60) == [], "processes of the run outlived its launcher"
    finally:
        run.kill_all()
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_die_with_parent_signals_at_once_when_the_parent_is_already_gone() -> None:
    got: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    try:
        assert die_with_parent(signal.SIGUSR1, expected_parent=os.getppid() + 1_000_000)
        assert got == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)
        _clear_parent_death_signal()


def _clear_parent_death_signal() -> None:
    import ctypes

    ctypes.CDLL(None).prctl(1, 0, 0, 0, 0)  # PR_SET_PDEATHSIG 0: pytest must not get SIGUSR1 from its parent


_LOOPING_SCRIPT = """
import time
from scaling.core.topology import TopologyConfig, init_distributed

init_distributed(TopologyConfig(data_parallel_size=2, device="cpu"))
print("ready", flush=True)
while True:  # a script with no signal handling of its own: SIGTERM ends it
    time.sleep(0.1)
"""


@pytest.mark.timeout(180)
def test_sigterm_to_scaling_launch_reaches_every_rank_without_a_torchrun_traceback(tmp_path: Path) -> None:
    script = tmp_path / "loop.py"
    script.write_text(_LOOPING_SCRIPT)
    config = tmp_path / "launch.yml"
    config.write_text(yaml.safe_dump({"runner": {"script": str(script), "module": False},
                                      "topology": {"data_parallel_size": 2, "device": "cpu"}}))  # fmt: skip
    run = Started([str(SCALING), "launch", str(config)])
    try:
        run.wait_for("ready", _START_S)
        started = descendants(run.process.pid)
        run.process.send_signal(signal.SIGTERM)
        code = run.wait(timeout_s=60)
        assert wait_gone(started, timeout_s=10) == [], run.output
        assert code == 128 + signal.SIGTERM, run.output  # stopped by the signal, as the script does not report
        assert "Traceback" not in run.output and "SignalException" not in run.output, run.output
    finally:
        run.kill_all()
