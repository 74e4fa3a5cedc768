"""How a queued run's attempt ends (``job_step end``), without Slurm: the record is the only word on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from scaling.cluster.queue import job_step, slurm
from scaling.cluster.queue.runs import CANCEL_MARKER
from scaling.experiment.records import begin_attempt, write_json_atomic


def _running(run_dir: Path, **queue: Any) -> None:
    record = begin_attempt(
        None, experiment="mark", run_name=run_dir.name, params={}, seed=0, git={}, command=[], hosts=["n1"], nproc=1
    )
    write_json_atomic(run_dir / "record.json", {**record, "queue": {"job_id": "7", **queue}})


def _record(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "record.json").read_text())


@pytest.fixture
def requeued(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(slurm, "requeue", calls.append)
    return calls


def test_failures_are_retried_within_the_budget_then_recorded_as_failed(tmp_path: Path, requeued: list[str]) -> None:
    _running(tmp_path, retries=1)
    assert job_step.end(tmp_path, 3, "") == 0  # requeued: the job itself ends cleanly
    record = _record(tmp_path)
    assert requeued == ["7"] and record["status"] == "failed" and record["exit_code"] == 3
    assert record["queue"]["retries_used"] == 1 and record["history"][-1]["requeued"] is True
    _running(tmp_path, retries=1, retries_used=1)
    assert job_step.end(tmp_path, 3, "") == 3
    assert requeued == ["7"] and _record(tmp_path)["status"] == "failed"  # the budget is spent: no requeue


def test_time_limit_warning_requeues_and_counts_a_preemption(tmp_path: Path, requeued: list[str]) -> None:
    _running(tmp_path, preemptions=2)
    assert job_step.end(tmp_path, 0, "USR1") == 0
    record = _record(tmp_path)
    assert requeued == ["7"] and record["status"] == "preempted" and record["queue"]["preemptions"] == 3


def test_sigterm_is_a_preemption_unless_the_run_was_cancelled(tmp_path: Path, requeued: list[str]) -> None:
    _running(tmp_path)
    job_step.end(tmp_path, 143, "TERM")
    assert _record(tmp_path)["status"] == "preempted" and requeued == []  # Slurm requeues it itself
    _running(tmp_path)
    (tmp_path / CANCEL_MARKER).write_text("7\n")
    job_step.end(tmp_path, 143, "TERM")
    assert _record(tmp_path)["status"] == "cancelled" and requeued == []
