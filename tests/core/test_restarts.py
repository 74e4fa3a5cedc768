"""Dead ranks and automatic restarts (``--max-restarts N``), and goodput.

The unit tests check the pieces in one process: what a restarted attempt loads
(``scaling.core.runner.restarts``), how much time a restart lost (``scaling.core.runner.goodput``) and that
every command passes ``--max-restarts`` on to torchrun. The two process tests ``kill -9`` one rank of a real
2-rank ``scaling train``: with ``--max-restarts 1`` the world restarts from the last checkpoint and its final
checkpoint equals, tensor for tensor, that of a run nobody killed; without it the job fails within seconds,
names the dead rank and leaves no process behind. A failure of the first points to the agent
(``scaling.core.runner.agent``: detection, stop, restart) or to the resume (``resume_after_restart``); a
mismatch of weights only, to what a checkpoint restores (data position, random streams).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scaling.core.runner.command_line import main as launch_main
from scaling.core.runner.goodput import GoodputClock, lost_since_previous_attempt
from scaling.core.runner.reports import RESTART_COUNT_ENV
from scaling.core.runner.restarts import JOB_START_ENV, restart_count, restart_overrides, resume_after_restart
from scaling.core.trainer.config import TrainerConfig

from .processes import SCALING, Started, rank_pids, tiny_config, tiny_run, wait_gone


def _fake_checkpoint(save_dir: Path, step: int) -> None:
    directory = save_dir / f"global_step{step}"
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text(json.dumps({"step": step}))


def test_a_restarted_attempt_resumes_everything_from_save_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "base"  # a finetuning run starts from base weights; a restart must not go back to them
    config = TrainerConfig(save_dir=tmp_path / "ckpt", load_dir=base, load="weights")
    monkeypatch.setenv(RESTART_COUNT_ENV, "0")
    assert restart_count() == 0 and resume_after_restart(config) is config  # the first attempt: as configured
    monkeypatch.setenv(RESTART_COUNT_ENV, "1")
    early = resume_after_restart(config)  # restarted before a checkpoint was complete: start as the first did
    assert early.load_dir == base and early.load == "weights" and early.allow_fresh_start_beside_checkpoints
    _fake_checkpoint(tmp_path / "ckpt", 3)
    resumed = resume_after_restart(config)
    assert resumed.load_dir == tmp_path / "ckpt" and resumed.load == "everything"
    assert resumed.train_iterations == config.train_iterations and resumed.save_dir == config.save_dir
    assert resume_after_restart(TrainerConfig()) == TrainerConfig()  # no save_dir: nothing to resume from


def _write_metrics(path: Path, records: list[dict[str, float]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "wall_ti')  # cut by the crash


def test_a_restart_loses_the_time_from_the_resumed_step_to_the_new_start(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    old = {"step": 50, "wall_time": 10.0, "restarts": 0}  # an earlier job in the same log: not this job's time
    first = [{"step": s, "wall_time": 100.0 + s, "step_time_s": 1.0, "restarts": 0} for s in range(1, 8)]
    _write_metrics(metrics, [old, *first])
    # The checkpoint of step 4 was written at 104; the attempt died after step 7; the new one starts at 120.
    assert lost_since_previous_attempt(metrics, 4, job_start=99.0, now=120.0) == pytest.approx(16.0)
    # A second restart: the attempt that resumed at step 4 trained to step 6 (no new checkpoint) and died.
    second = [{"step": s, "wall_time": 120.0 + s, "step_time_s": 1.0, "restarts": 1, "lost_to_restarts_s": 16.0}
              for s in (5, 6)]  # fmt: skip
    _write_metrics(metrics, [old, *first, *second])
    # Its own time counts from its start (at 124, before its first step), on top of the first restart's loss.
    assert lost_since_previous_attempt(metrics, 4, job_start=99.0, now=130.0) == pytest.approx(16.0 + 6.0)
    # The previous attempt left no record at all: everything since the job started is lost.
    assert lost_since_previous_attempt(tmp_path / "missing.jsonl", 4, job_start=99.0, now=130.0) == 31.0


def test_goodput_is_the_fraction_of_wall_time_not_lost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(JOB_START_ENV, "100")
    monkeypatch.setenv(RESTART_COUNT_ENV, "0")
    clean = GoodputClock.for_attempt(tmp_path, 0, now=101.0)
    assert clean.metrics(now=200.0) == {
        "goodput": 1.0,
        "wall_s": 100.0,
        "lost_to_restarts_s": 0.0,
        "lost_to_rollbacks_s": 0.0,
        "lost_to_checkpoints_s": 0.0,
        "restarts": 0.0,
        "wall_time": 200.0,
    }
    _write_metrics(tmp_path / "metrics.jsonl", [{"step": 2, "wall_time": 110.0, "step_time_s": 1.0, "restarts": 0}])
    monkeypatch.setenv(RESTART_COUNT_ENV, "1")
    restarted = GoodputClock.for_attempt(tmp_path, 2, now=130.0)  # 20 s lost: from step 2's record to now
    assert restarted.lost_s == pytest.approx(20.0) and restarted.restarts == 1
    assert restarted.metrics(now=200.0)["goodput"] == pytest.approx(1.0 - 20.0 / 100.0)


def test_max_restarts_reaches_torchrun_from_every_command(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "run.yml"
    config.write_text("topology: {data_parallel_size: 2}\n")
    assert launch_main([str(config), "--max-restarts", "3", "--dry-run"]) == 0
    assert "--max-restarts=3" in capsys.readouterr().out
    assert launch_main([str(config), "--max-restarts", "-1", "--dry-run"]) == 2
    assert "runner.max_restarts" in capsys.readouterr().err  # bad input names the field
    assert restart_overrides(argparse.Namespace(max_restarts=None)) == []

    from scaling.experiment.run_command import _parser

    assert _parser("scaling run").parse_args(["exp", "--max-restarts", "2"]).max_restarts == 2


_FLAKY = """
import os, sys, time
attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
with open(sys.argv[1], "a") as starts:
    starts.write(f"{attempt}:{rank}\\n")
if sys.argv[2] == "bad-input" and rank == 1:
    sys.exit(2)  # what run_as_worker returns for a config, data or checkpoint error
if attempt == 0 and rank == 1:
    os.kill(os.getpid(), 9)
if attempt == 0:
    time.sleep(60)  # waits for its peer, as a rank in a collective would, until the launcher stops it
"""


def _launch_flaky(tmp_path: Path, mode: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    script, starts = tmp_path / "flaky.py", tmp_path / f"starts-{mode}.txt"
    script.write_text(_FLAKY)
    config = tmp_path / "launch.yml"
    runner = {"script": str(script), "module": False, "script_args": [str(starts), mode]}
    config.write_text(json.dumps({"runner": runner, "topology": {"data_parallel_size": 2}}))
    result = subprocess.run(
        [str(SCALING), "launch", str(config), "--max-restarts", "2"], capture_output=True, text=True, timeout=90
    )
    return result, sorted(starts.read_text().split())


def test_the_agent_restarts_a_world_whose_rank_was_killed_and_names_it(tmp_path: Path) -> None:
    started = time.monotonic()
    result, starts = _launch_flaky(tmp_path, "kill")
    assert result.returncode == 0, result.stderr[-3000:]
    assert starts == ["0:0", "0:1", "1:0", "1:1"]  # one restart of both ranks, not of the dead one only
    restarts = [line for line in result.stderr.splitlines() if "restarting the world" in line]
    assert len(restarts) == 1 and "rank 1 was killed by SIGKILL" in restarts[0], result.stderr[-3000:]
    assert "(restart 1 of 2)" in restarts[0]
    assert time.monotonic() - started < 45  # the sleeping survivor was stopped, not waited for (60 s)


def test_the_agent_does_not_restart_bad_input(tmp_path: Path) -> None:
    result, starts = _launch_flaky(tmp_path, "bad-input")
    assert result.returncode == 2, result.stderr[-3000:]
    assert starts == ["0:0", "0:1"]  # a restart would fail the same way: none
    assert "restarting" not in result.stderr


def _final_tensors(save_dir: Path, step: int) -> dict[str, torch.Tensor]:
    directory = save_dir / f"global_step{step}"
    tensors = {}
    for path in sorted(directory.rglob("*.safetensors")):
        for name, value in load_file(path).items():
            tensors[f"{path.relative_to(directory)}:{name}"] = value
    assert tensors, f"no safetensors in {directory}"
    return tensors


_STEPS, _EVERY = 300, 25  # long enough that the kill lands mid-run; a checkpoint every 25 steps


@pytest.mark.timeout(240)
def test_kill_9_of_a_rank_under_max_restarts_1_restarts_and_ends_with_the_uninterrupted_weights(
    tmp_path: Path,
) -> None:
    topology = {"data_parallel_size": 2, "micro_batch_size": 2, "gradient_accumulation_steps": 1, "device": "cpu"}
    loop = {"train_iterations": _STEPS, "log_interval": 50, "save_interval": _EVERY, "save_dir": str(tmp_path / "a")}
    config = tiny_config(tmp_path, topology, loop)
    straight = Started([str(SCALING), "train", str(config)])
    try:
        assert straight.wait(timeout_s=120) == 0, straight.output[-3000:]
    finally:
        straight.kill_all()

    killed_dir = tmp_path / "b"
    run = Started(
        [str(SCALING), "train", str(config), "-o", f"trainer.save_dir={killed_dir}", "--max-restarts", "1",
         "-o", f"logger.log_dir={tmp_path / 'logs_b'}"]
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (killed_dir / "latest").is_file() and time.monotonic() < deadline and run.process.poll() is None:
            time.sleep(0.02)
        ranks = rank_pids(run.process.pid)
        assert set(ranks) == {0, 1}, run.output[-3000:]
        os.kill(ranks[1], signal.SIGKILL)
        killed_at = time.monotonic()
        line = run.wait_for("restarting the world", 30)
        assert "rank 1 was killed by SIGKILL" in line, line
        assert time.monotonic() - killed_at < 15, "the world took too long to notice the dead rank"
        assert run.wait(timeout_s=150) == 0, run.output[-3000:]
    finally:
        run.kill_all()
    assert (killed_dir / "latest").read_text() == f"global_step{_STEPS}"
    reference, restarted = _final_tensors(tmp_path / "a", _STEPS), _final_tensors(killed_dir, _STEPS)
    assert reference.keys() == restarted.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensor, restarted[name]), f"{name} differs after the restart"
    records = [json.loads(line) for line in (tmp_path / "logs_b" / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["step"] == _STEPS and last["restarts"] == 1, last
    assert last["lost_to_restarts_s"] > 0 and 0 < last["goodput"] < 1, last


@pytest.mark.timeout(120)
def test_kill_9_of_a_rank_without_restarts_fails_naming_it_and_leaves_no_process(tmp_path: Path) -> None:
    run = Started([str(SCALING), "train", str(tiny_run(tmp_path))])
    started: list[int] = []
    try:
        run.wait_for("step 2/", 90)
        ranks = rank_pids(run.process.pid)
        assert set(ranks) == {0, 1}, run.output[-3000:]
        started = [run.process.pid, *run.descendants()]
        os.kill(ranks[1], signal.SIGKILL)
        killed_at = time.monotonic()
        code = run.wait(timeout_s=60)
        stopped_after = time.monotonic() - killed_at
        assert code != 0, run.output[-3000:]
        assert "rank 1 was killed by SIGKILL" in run.output, run.output[-3000:]
        assert "restarting" not in run.output
        assert stopped_after < 15, f"the job took {stopped_after:.1f} s to stop after its rank died"
        assert wait_gone(started, 10) == [], "processes of the failed job are still alive"
    finally:
        run.kill_all()
