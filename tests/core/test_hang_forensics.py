"""Hang forensics: a run in which no rank progresses ends within ``hang_timeout_s`` with one line naming the
rank(s) that did not arrive and what they were doing, and every rank's stacks and recent instructions and
collectives in ``<run dir>/hang/rank_N.txt``.

Where to look when one fails:

* ``test_culprits_*``: the pure rule that picks the ranks to name (scaling.core.trainer.hang.culprits);
* ``test_heartbeat_*``: what a rank records (scaling.core.trainer.heartbeat); the distributed one checks that
  real gloo collectives are recorded with their group and peer, and that torch.distributed is restored;
* ``test_watchdogs_*``: several HangWatchdogs in one process over a HashStore, one of them "stopped" (its
  thread no longer publishes): detection, dumps, the single report, and no false alarm while progressing;
* the last test SIGSTOPs one rank of a real 2-rank ``scaling train`` and reads the job's last line.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from scaling.core.pipeline.schedule import Backward, Forward
from scaling.core.testing import DistributedTestFailure, run_distributed
from scaling.core.trainer.config import TrainerConfig
from scaling.core.trainer.hang import HangWatchdog, culprits, hang_line, watch_for_hangs
from scaling.core.trainer.heartbeat import Heartbeat, record_collectives

from .processes import SCALING, Started, rank_pids, tiny_config, tiny_run


def _view(rank: int, *, in_collective: bool = True, collectives: int = 10) -> dict[str, object]:
    return {"where": f"rank {rank}", "in_collective": in_collective, "collectives": collectives, "doing": "x"}


def test_culprits_names_unresponsive_ranks_first_then_busy_then_behind() -> None:
    views = {r: _view(r) for r in range(4)}
    assert culprits(views, responsive={0, 1, 3}, world_size=4) == {2: "stopped responding"}
    assert culprits({0: _view(0)}, responsive={0}, world_size=2) == {1: "never published a heartbeat"}
    busy = {**views, 1: _view(1, in_collective=False)}
    assert culprits(busy, responsive={0, 1, 2, 3}, world_size=4) == {1: "is busy outside any collective"}
    behind = {**views, 3: _view(3, collectives=9)}
    assert list(culprits(behind, responsive={0, 1, 2, 3}, world_size=4)) == [3]
    assert culprits(views, responsive={0, 1, 2, 3}, world_size=4) == {}  # all wait in the same one


def test_hang_line_is_one_line_naming_rank_doing_and_where_the_dumps_are(tmp_path: Path) -> None:
    views = {0: {"where": "rank 0 (pp 0, dp 0, tp 0)", "doing": "a"}, 1: {"where": "rank 1 (pp 0, dp 1, tp 0)",
             "doing": "step 3, forward/backward, micro-batch 0, instruction Forward(micro=0, chunk=0)"}}  # fmt: skip
    line = hang_line({1: "stopped responding"}, views, 61.2, tmp_path / "hang", waiting="step 3, in all_reduce")
    assert "\n" not in line and "no rank made progress for 61 s" in line
    assert "rank 1 did not arrive: rank 1 (pp 0, dp 1, tp 0) stopped responding" in line
    assert "instruction Forward(micro=0, chunk=0)" in line and "in all_reduce" in line and str(tmp_path) in line


def test_heartbeat_keeps_the_last_instruction_after_the_phase_changes() -> None:
    beat = Heartbeat("rank 0")
    beat.beat("forward/backward", 3)
    beat.on_instruction(3, Forward(micro=1, chunk=0))
    assert beat.doing() == "step 3, forward/backward, micro-batch 1, instruction Forward(micro=1, chunk=0)"
    progress = beat.progress
    beat.on_instruction(3, Backward(micro=1, chunk=0))
    beat.beat("optimizer", 3)
    assert beat.progress == progress + 2
    assert beat.doing() == "step 3, optimizer, after instruction Backward(micro=1, chunk=0)"
    assert "Forward(micro=1, chunk=0)" in beat.history() and "Backward(micro=1, chunk=0)" in beat.history()
    assert TrainerConfig().hang_timeout_s == 60  # reported in about a minute by default
    assert TrainerConfig(hang_timeout_s=None).hang_timeout_s is None


def _collectives_recorded() -> dict[str, object]:
    original = dist.all_reduce
    beat = Heartbeat(f"rank {dist.get_rank()}")
    with record_collectives(beat):
        dist.all_reduce(torch.ones(2, 3))
        if dist.get_rank() == 0:
            dist.send(torch.ones(4), 1)
        else:
            dist.recv(torch.empty(4), 0)
        doing = beat.doing()
        with pytest.raises(RuntimeError, match="already recorded"), record_collectives(Heartbeat("again")):
            pass
    dist.barrier()  # outside: not recorded
    return {
        "doing": doing,
        "count": beat.collectives,
        "history": beat.history(),
        "restored": original is dist.all_reduce,
    }


def test_heartbeat_records_real_collectives_with_group_and_peer() -> None:
    results = run_distributed(_collectives_recorded, 2, timeout_s=60)
    assert all(r["count"] == 2 and r["restored"] for r in results), results
    assert "last collective send(to rank 1, shape [4], the whole world)" in results[0]["doing"]
    assert "last collective recv(from rank 0, shape [4], the whole world)" in results[1]["doing"]
    assert "all_reduce(shape [2, 3], the whole world)" in results[0]["history"]


def _loop_that_stops_on_rank_1(dump_dir: str) -> None:
    with watch_for_hangs(timeout_s=1.0, dump_dir=dump_dir) as heartbeat:
        for step in range(1000):  # bounded: rank 0 leaves through the watchdog long before
            heartbeat.beat("step", step)
            if step == 3 and dist.get_rank() == 1:
                time.sleep(0.3)  # a few publications (every 0.05 s here) show this step
                os.kill(os.getpid(), signal.SIGSTOP)  # the harness SIGKILLs it afterwards
            dist.all_reduce(torch.ones(2))


def test_watch_for_hangs_in_a_loop_of_ones_own_names_the_stopped_rank(tmp_path: Path) -> None:
    with pytest.raises(DistributedTestFailure) as failure:
        run_distributed(_loop_that_stops_on_rank_1, 2, str(tmp_path), timeout_s=30)
    assert "rank 0" in str(failure.value) and "exited with code 1" in str(failure.value), failure.value
    line = (tmp_path / "rank_0.txt").read_text().splitlines()[0]
    assert (
        "no rank made progress" in line
        and "rank 1 did not arrive: rank 1 stopped responding (last seen: step 3" in line
    ), line
    assert "step 3, step, last collective all_reduce(shape [2], the whole world)" in line, line
    assert "rank 0 was doing: step 3, step, waiting in all_reduce" in (tmp_path / "rank_0.txt").read_text()
    assert "did not respond" in (tmp_path / "rank_1.txt").read_text()


def _watchdogs(tmp_path: Path, world: int, timeout_s: float) -> tuple[list[HangWatchdog], list[list[int]]]:
    store = dist.HashStore()
    exits: list[list[int]] = [[] for _ in range(world)]
    dogs = [
        HangWatchdog(Heartbeat(f"rank {r} (pp 0, dp {r}, tp 0)"), store, r, world, timeout_s, tmp_path / "hang",
                     slow_timeout_s=4 * timeout_s, on_hang=exits[r].append, record=False)
        for r in range(world)
    ]  # fmt: skip
    return dogs, exits


def _wait(predicate: object, timeout_s: float) -> float:
    start = time.monotonic()
    while not predicate() and time.monotonic() - start < timeout_s:  # type: ignore[operator]
        time.sleep(0.02)
    return time.monotonic() - start


def test_watchdogs_name_the_stopped_rank_and_its_instruction_and_every_live_rank_dumps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SCALING_REPORT_DIR", raising=False)  # no launcher: the line is logged
    dogs, exits = _watchdogs(tmp_path, 3, timeout_s=0.5)
    for dog in dogs:
        dog.heartbeat.beat("forward/backward", 7)
    dogs[2].heartbeat.on_instruction(7, Forward(micro=1, chunk=0))
    dogs[0].heartbeat.enter("all_reduce", None, None, (2,))  # the live ranks wait for rank 2
    dogs[1].heartbeat.enter("all_reduce", None, None, (2,))
    for dog in dogs:
        dog.start()
    time.sleep(0.3)
    dogs[2]._stopped.set()  # rank 2 stops: its thread publishes no more (as under SIGSTOP)
    try:
        took = _wait(lambda: exits[0] and exits[1], 6)
        assert exits[0] == [1] and exits[1] == [1] and exits[2] == [], exits
        assert took < 0.5 + 3, took  # the timeout, three publications to tell the living, and the files
        reporters = [rank for rank, dog in enumerate(dogs) if dog.line is not None]
        assert len(reporters) == 1, reporters  # one rank reports: whichever live rank claims it first
        line = dogs[reporters[0]].line
        assert line is not None
        assert "rank 2 did not arrive: rank 2 (pp 0, dp 2, tp 0) stopped responding" in line, line
        assert "instruction Forward(micro=1, chunk=0)" in line and "waiting in all_reduce" in line, line
        own = (tmp_path / "hang" / f"rank_{reporters[0]}.txt").read_text()
        assert own.startswith(line) and "recent collectives" in own and "MainThread" in own, own
        assert "rank 2 (pp 0, dp 2, tp 0): step 7, forward/backward" in own  # every rank's last heartbeat
        for live in (0, 1):  # each live rank dumps its own file, starting with its own view of the hang
            text = (tmp_path / "hang" / f"rank_{live}.txt").read_text()
            assert text.startswith("the run hung: no rank made progress") and "waiting in all_reduce" in text
        stopped = (tmp_path / "hang" / "rank_2.txt").read_text()
        assert "did not respond" in stopped and "Forward(micro=1, chunk=0)" in stopped, stopped
    finally:
        for dog in dogs:
            dog.stop()


def test_watchdogs_stay_quiet_while_any_rank_progresses_and_allow_a_slow_save(tmp_path: Path) -> None:
    dogs, exits = _watchdogs(tmp_path, 2, timeout_s=0.3)
    for dog in dogs:
        dog.start()
    stop = threading.Event()

    def work() -> None:  # only rank 1 progresses: the others wait for it, which is no hang
        step = 0
        while not stop.wait(0.05):
            step += 1
            dogs[1].heartbeat.beat("forward/backward", step)

    worker = threading.Thread(target=work)
    worker.start()
    try:
        time.sleep(1.2)  # four timeouts
        assert exits == [[], []]
        stop.set()
        worker.join()
        for dog in dogs:
            dog.heartbeat.beat("save", 9, slow=True)  # a save may take slow_timeout_s (1.2 s) without events
        time.sleep(0.7)
        assert exits == [[], []]
        assert _wait(lambda: exits[0] and exits[1], 4) < 4 and exits == [[1], [1]]
        line = next(dog.line for dog in dogs if dog.line)
        assert "no rank is in a collective" in line and "step 9, save" in line, line
    finally:
        stop.set()
        for dog in dogs:
            dog.stop()


PIPELINE = {"pipe_parallel_size": 2, "data_parallel_size": 1, "micro_batch_size": 2, "gradient_accumulation_steps": 2,
            "device": "cpu"}  # fmt: skip


@pytest.mark.timeout(180)
@pytest.mark.parametrize("layout", ["dp 2", "pp 2"])
def test_a_stopped_rank_is_named_by_rank_and_instruction_and_the_job_exits(tmp_path: Path, layout: str) -> None:
    if layout == "dp 2":
        config, where = tiny_run(tmp_path, hang_timeout_s=3), "rank 1 (pp 0, dp 1, tp 0)"
    else:  # the last stage stops: the first waits for its gradients
        loop = {"train_iterations": 100_000, "log_interval": 1, "save_dir": str(tmp_path / "ckpt"), "hang_timeout_s": 3}
        config, where = tiny_config(tmp_path, PIPELINE, loop), "rank 1 (pp 1, dp 0, tp 0)"
    run = Started(
        [str(SCALING), "train", str(config)],
        env={"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "2"},  # the stopped rank ignores SIGTERM: SIGKILL comes after this
    )
    stopped = None
    try:
        run.wait_for("step 30/", 120)  # several publications of each rank's heartbeat have been made
        ranks = rank_pids(run.process.pid)
        assert set(ranks) == {0, 1}, run.output[-3000:]
        stopped = ranks[1]
        os.kill(stopped, signal.SIGSTOP)
        signal_sent = time.monotonic()
        code = run.wait(timeout_s=60)
        exited_after = time.monotonic() - signal_sent
        assert code != 0, run.output[-3000:]
        assert exited_after < 3 + 12, exited_after  # the timeout, the report, the launcher's 2 s shutdown
        lines = [line for line in run.output.splitlines() if "the run hung" in line]
        assert len(lines) == 1, run.output[-3000:]
        line = lines[0]
        assert f"rank 1 did not arrive: {where} stopped responding" in line, line
        stopped_in = re.search(r"stopped responding \(last seen: step (\d+), .*?instruction \w+\(micro=\d", line)
        assert stopped_in is not None and int(stopped_in.group(1)) >= 10, line  # what rank 1 was doing
        waits = (
            r"the others wait \(step \d+, .*(waiting in|probably waiting for the asynchronous|last collective) \w+\("
        )
        assert re.search(waits, line), line  # and what rank 0 waits in (a collective or a pipeline recv)
        assert "Traceback" not in run.output, run.output[-3000:]
        dumps = tmp_path / "ckpt" / "hang"
        assert "Python stacks of every thread" in (dumps / "rank_0.txt").read_text()
        assert "did not respond" in (dumps / "rank_1.txt").read_text()
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)
        run.kill_all()
