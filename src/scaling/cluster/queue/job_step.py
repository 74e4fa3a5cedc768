"""What the batch script of a queued run calls around its training step (never by hand):

    python -m scaling.cluster.queue.job_step begin --run-dir DIR
    python -m scaling.cluster.queue.job_step end --run-dir DIR --exit-code CODE --signal USR1|TERM|

``begin`` turns the record into a running attempt (job id, restart count, the allocated hosts). ``end``
decides how the attempt ended and what happens next, since no accounting database tells it later:

- ``scaling queue cancel`` left its marker: ``cancelled``;
- USR1 (the time limit's warning): ``preempted``, and this job requeues itself (``scontrol requeue``);
- TERM without the marker (preemption, ``scontrol requeue``): ``preempted``; Slurm requeues the job itself;
- exit code 0: ``completed``; any other: ``failed`` with that code, requeued while the run's retry budget
  (``--retries``) lasts, each retry recorded, never endlessly.

The requeued job is the same run: the worker points ``current_run().last_checkpoint`` at its newest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scaling.cluster.queue import slurm
from scaling.cluster.queue.runs import CANCEL_MARKER
from scaling.experiment.records import RunPaths, RunStatus, begin_attempt, end_attempt, read_record, write_json_atomic

__all__ = ["begin", "end", "main"]


def _hosts() -> list[str]:
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return []
    try:
        return slurm.hostnames(nodelist)
    except slurm.SlurmError:
        return [nodelist]


def begin(run_dir: Path) -> int:
    record = read_record(run_dir)
    if (run_dir / CANCEL_MARKER).exists():
        print(f"run {run_dir.name} was cancelled before it started", file=sys.stderr)
        return 1
    queue: dict[str, Any] = dict(record.get("queue") or {})
    nodes = int(os.environ.get("SLURM_NNODES", queue.get("nodes", 1)))
    attempt = begin_attempt(
        record,
        experiment=record["experiment"],
        run_name=record["run_name"],
        params=record.get("params") or {},
        seed=int(record["seed"]),
        git=record.get("git") or {},
        command=list(record.get("command") or []),
        hosts=_hosts(),
        nproc=nodes * int(queue.get("nproc_per_node", 1)),
    )
    queue.update(
        job_id=os.environ.get("SLURM_JOB_ID", queue.get("job_id")),
        restarts=int(os.environ.get("SLURM_RESTART_COUNT", "0")),
    )
    attempt["history"][-1]["job_id"] = queue["job_id"]
    RunPaths(run_dir).logs.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RunPaths(run_dir).record, {**record, **attempt, "queue": queue})
    print(f"run {run_dir.name}: attempt {attempt['attempts']} of job {queue['job_id']} on {' '.join(attempt['hosts'])}")
    return 0


def _outcome(run_dir: Path, code: int, signal: str, queue: dict[str, Any]) -> tuple[RunStatus, bool]:
    """(status of the attempt, whether this job must requeue itself)."""
    if (run_dir / CANCEL_MARKER).exists():
        return "cancelled", False
    if signal in ("USR1", "TERM"):
        queue["preemptions"] = int(queue.get("preemptions", 0)) + 1
        return "preempted", signal == "USR1"
    if code == 0:
        return "completed", False
    if int(queue.get("retries_used", 0)) < int(queue.get("retries", 0)):
        queue["retries_used"] = int(queue.get("retries_used", 0)) + 1
        return "failed", True
    return "failed", False


def end(run_dir: Path, code: int, signal: str) -> int:
    record = read_record(run_dir)
    queue: dict[str, Any] = dict(record.get("queue") or {})
    status, requeue = _outcome(run_dir, code, signal, queue)
    ended = end_attempt(record, status, code)
    if requeue:
        ended["history"][-1]["requeued"] = True
    write_json_atomic(RunPaths(run_dir).record, {**ended, "queue": queue})
    print(f"run {run_dir.name}: attempt {record.get('attempts')} {status} (exit code {code})")
    if requeue and queue.get("job_id"):
        print(f"run {run_dir.name}: requeueing job {queue['job_id']}; it resumes from its newest checkpoint")
        sys.stdout.flush()
        slurm.requeue(str(queue["job_id"]))
        return 0
    return code if status != "preempted" else 0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scaling.cluster.queue.job_step", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    begin_parser = sub.add_parser("begin")
    begin_parser.add_argument("--run-dir", required=True, type=Path)
    end_parser = sub.add_parser("end")
    end_parser.add_argument("--run-dir", required=True, type=Path)
    end_parser.add_argument("--exit-code", required=True, type=int)
    end_parser.add_argument("--signal", default="")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    run_dir = args.run_dir.resolve()
    if args.action == "begin":
        return begin(run_dir)
    return end(run_dir, args.exit_code, args.signal)


if __name__ == "__main__":
    sys.exit(main())
