"""``scaling queue`` against a real (private, single-node, 2-CPU) Slurm: order, exclusive and shared jobs,
cancel by exact name, a failing run, and a requeued run that resumes from its checkpoint.

Two combined scenarios keep the cost down (each job pays torchrun's start): Slurm runs the jobs while the
test waits, and the checks read what the jobs wrote (their records, their own wall-clock timestamps).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.cluster.slurm_cluster import SlurmCluster

from scaling.cluster.queue.command import main
from scaling.experiment.registry import find_experiment

SHARED = ("--shared", "--cpus-per-task", "1")


@pytest.fixture
def on_cluster(slurm: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    """The private cluster, also for `scaling queue` run in this process (its Slurm commands inherit SLURM_CONF)."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    return slurm


def _submit(slurm: SlurmCluster, project: Path, experiment: str, name: str, *args: str) -> str:
    """``scaling queue submit`` in this process: a subprocess would spend seconds importing torch each time."""
    code, out, err = _queue(project, "submit", experiment, "--run-name", name, *args)
    assert code == 0, err
    match = re.search(r"submitted job (\d+): run (\S+) of", out)
    assert match and match.group(2) == name, out
    return match.group(1)


def _queue(project: Path, *args: str) -> tuple[int, str, str]:
    """``scaling queue ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*args, "--project", str(project)])
    return code, out.getvalue(), err.getvalue()


def _job_state(slurm: SlurmCluster, job_id: str) -> str:
    return slurm.run("squeue", "-h", "--states=all", "-j", job_id, "-o", "%T").stdout.strip()


def _record(project: Path, experiment: str, name: str) -> dict[str, Any]:
    path = project / "runs" / experiment / name / "record.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _times(project: Path, name: str) -> tuple[float, float]:
    times = json.loads((project / "runs" / "mark" / name / "times.json").read_text())
    return times["start"], times["end"]


def _wait(condition: Callable[[], bool], timeout: float, what: str, slurm: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            queue = slurm.run("squeue", "-o", "%i %j %T %r").stdout
            pytest.fail(f"{what}: not within {timeout:.0f} s; squeue:\n{queue}")
        time.sleep(0.3)


def _status(project: Path, experiment: str, name: str) -> str | None:
    return _record(project, experiment, name).get("status")


@pytest.mark.timeout(150)
def test_jobs_run_in_order_exclusive_apart_and_shared_together(on_cluster: SlurmCluster, project: Path) -> None:
    """Five submissions in order: two exclusive 2-node jobs (one after the other, each across both nodes with
    a rendezvous of 2 ranks), then three 1-CPU shared jobs, which run at the same time."""
    slurm = on_cluster
    runs = [("e1", ("--nodes", "2")), ("e2", ("--nodes", "2"))]
    runs += [(name, (*SHARED, "--param", "seconds=5")) for name in ("s1", "s2", "s3")]  # start-up spread < 5 s
    for name, args in runs:
        _submit(slurm, project, "mark", name, *args)
    code, listing, err = _queue(project, "list")
    assert code == 0, err
    last = next(line.split() for line in listing.splitlines() if line.startswith("s3 "))
    assert last[3] == "pending" and len(last) >= 8, listing  # with the reason (Priority, Resources...)

    names = [name for name, _ in runs]
    _wait(lambda: all(_status(project, "mark", n) == "completed" for n in names), 120, "5 runs completed", slurm)
    times = {name: json.loads((project / "runs" / "mark" / name / "times.json").read_text()) for name in names}
    starts = [times[name]["start"] for name in names]
    assert starts[0] < starts[1] < min(starts[2:]), times  # Slurm's order; the shared three start together
    for name in ("e1", "e2"):
        assert times[name]["world_size"] == 2, times[name]  # torchrun on each node, one rendezvous
        assert _record(project, "mark", name)["hosts"] == ["n1", "n2"]
    assert times["e1"]["end"] <= times["e2"]["start"], "the exclusive jobs overlapped"
    shared = [times[name] for name in ("s1", "s2", "s3")]
    assert times["e2"]["end"] <= min(t["start"] for t in shared), "a shared job ran beside an exclusive one"
    assert max(t["start"] for t in shared) < min(t["end"] for t in shared), "the shared jobs did not run together"
    assert len({t["node"] for t in shared}) < len(shared), "no two shared jobs shared a node"
    listing = _queue(project, "list")[1]
    for name in names:
        row = next(line.split() for line in listing.splitlines() if line.startswith(f"{name} "))
        assert row[1:4] == ["mark", _record(project, "mark", name)["queue"]["job_id"], "completed"], listing


@pytest.mark.timeout(150)
def test_cancel_exact_name_failure_and_requeue_resume(on_cluster: SlurmCluster, project: Path) -> None:
    """Four 1-CPU jobs at once: alpaca (cancelled; alpaca_v2 runs on), boom (fails), resume (requeued mid-run)."""
    slurm = on_cluster
    _submit(slurm, project, "mark", "alpaca", *SHARED, "--param", "seconds=60")
    _submit(slurm, project, "mark", "alpaca_v2", *SHARED, "--param", "seconds=10")
    _submit(slurm, project, "mark", "boom", *SHARED, "--param", "fail=3")
    resume = _submit(slurm, project, "train", "resume", *SHARED, "--param", "steps=30", "--param", "step_seconds=0.5")
    both = ("alpaca", "alpaca_v2")
    _wait(lambda: all(_status(project, "mark", n) == "running" for n in both), 60, "both alpacas running", slurm)

    assert _queue(project, "cancel", "alpac")[0] == 2  # a prefix names no run
    code, out, err = _queue(project, "cancel", "alpaca")
    assert code == 0 and "cancelled" in out, err
    alpaca = _record(project, "mark", "alpaca")["queue"]["job_id"]
    _wait(lambda: _job_state(slurm, alpaca) == "CANCELLED", 30, "alpaca's job cancelled", slurm)
    assert _status(project, "mark", "alpaca") == "cancelled"
    assert _job_state(slurm, _record(project, "mark", "alpaca_v2")["queue"]["job_id"]) == "RUNNING"

    # Requeued mid-run: the job ends its attempt as preempted after saving, and Slurm starts it again.
    saved = project / "runs" / "train" / "resume" / "saved_step"
    _wait(lambda: saved.exists() and int(saved.read_text() or 0) >= 2, 60, "resume saved step 2", slurm)
    assert slurm.run("scontrol", "requeue", resume).returncode == 0
    # Slurm holds a requeued batch job back about two minutes (BeginTime); the test lets it start at once.
    _wait(lambda: _job_state(slurm, resume) == "PENDING", 30, "requeued job pending", slurm)
    assert slurm.run("scontrol", "update", f"JobId={resume}", "StartTime=now").returncode == 0

    follow = slurm.queue(project, "logs", "alpaca_v2", "-f", timeout=60)  # returns when the job ends
    assert follow.returncode == 0 and "attempt 1 of run alpaca_v2, rank 0" in follow.stdout, follow.stderr
    _wait(lambda: _status(project, "mark", "alpaca_v2") == "completed", 20, "alpaca_v2 completed", slurm)

    _wait(lambda: _status(project, "mark", "boom") == "failed", 60, "boom failed", slurm)
    code, out, err = _queue(project, "status", "boom")
    assert code == 0, err
    assert re.search(r"^state\s+failed \(exit [1-9]\d*\)$", out, re.M), out
    assert "RuntimeError: failing on purpose (3)" in out, out

    _wait(lambda: _status(project, "train", "resume") == "completed", 90, "resume completed", slurm)
    record = _record(project, "train", "resume")
    assert record["attempts"] == 2 and record["queue"]["preemptions"] == 1, record
    assert [a["status"] for a in record["history"]] == ["preempted", "completed"], record["history"]
    log = (project / "runs" / "train" / "resume" / "logs" / "rank_0.log").read_text()
    resumed = re.search(r"resumed from step (\d+)", log)
    assert resumed and 2 <= int(resumed.group(1)) < 30, log
    assert re.search(r"stop requested at step \d+: saving", log), log  # SIGTERM reached the loop, which saved
    final = json.loads((project / "runs" / "train" / "resume" / "final.json").read_text())
    uninterrupted = find_experiment(project, "train").run({"steps": 30}, seed=0)
    assert final == uninterrupted
    listing = _queue(project, "list")[1]
    row = next(line.split() for line in listing.splitlines() if line.startswith("resume "))
    assert row[3] == "completed" and row[-1] == "1", listing
