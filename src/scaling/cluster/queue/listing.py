"""``scaling queue list`` and ``scaling queue status RUN``: the runs' records joined with what Slurm knows.

While Slurm knows a job (pending, running, just ended) its state, elapsed time and pending reason come from
``squeue``; once it has forgotten the job the record, which the job itself wrote (:mod:`.job_step`), is
the word on how the run ended: completed, failed with its exit code, cancelled, preempted N times.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from scaling.cluster.queue import slurm
from scaling.cluster.queue.runs import QueuedRun
from scaling.experiment.describe import format_table
from scaling.experiment.rank_output import last_attempt

__all__ = ["LIVE_STATES", "failure_tail", "list_text", "run_state", "status_text"]

LIVE_STATES = frozenset(
    {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "RESIZING"}
)


def _elapsed(record: dict[str, Any]) -> str:
    history = record.get("history") or []
    if not history or not history[-1].get("started"):
        return "-"
    start = datetime.fromisoformat(history[-1]["started"])
    end = datetime.fromisoformat(history[-1]["ended"]) if history[-1].get("ended") else datetime.now().astimezone()
    seconds = max(0, int((end - start).total_seconds()))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run_state(run: QueuedRun, job: slurm.JobState | None) -> str:
    """What the run is now: Slurm's state while its job lives, else the record's final word.

    A completed or cancelled run is never requeued, so its record wins even while Slurm still lists the job
    (the batch shell's last lines run after the job step has recorded the end)."""
    final = run.record.get("status") in ("completed", "cancelled")
    if job is not None and job.state in LIVE_STATES and not final:
        return job.state.lower()
    status = str(run.record.get("status"))
    if status == "failed" and run.record.get("exit_code") is not None:
        return f"failed (exit {run.record['exit_code']})"
    return status


def _row(run: QueuedRun, job: slurm.JobState | None) -> list[str]:
    live = job is not None and job.state in LIVE_STATES
    preempted = int(run.queue.get("preemptions", 0))
    return [
        run.name,
        str(run.record.get("experiment", run.run_dir.parent.name)),
        str(run.job_id),
        run_state(run, job),
        job.nodes if live and job is not None else str(run.queue.get("nodes", "-")),
        job.elapsed if live and job is not None else _elapsed(run.record),
        job.reason if live and job is not None and job.state == "PENDING" else "",
        str(preempted),
    ]


def list_text(runs: list[QueuedRun]) -> str:
    if not runs:
        return "no queued runs\n"
    jobs = slurm.job_states([str(run.job_id) for run in runs])
    rows = [_row(run, jobs.get(str(run.job_id))) for run in runs]
    headers = ("RUN", "EXPERIMENT", "JOB", "STATE", "NODES", "ELAPSED", "REASON", "PREEMPTED")
    return format_table(headers, rows) + "\n"


def failure_tail(run: QueuedRun, lines: int = 20) -> tuple[str, list[str]]:
    """(which log, its last lines): the first rank log of the last attempt with a traceback, else rank 0's,
    else Slurm's own output of the job."""
    logs = sorted(run.paths.logs.glob("rank_*.log"), key=lambda p: int(p.stem.removeprefix("rank_") or 0))
    attempts = [(log, last_attempt(log)) for log in logs]
    for log, attempt in attempts:
        if any(line.startswith("Traceback") for line in attempt):
            return str(log), attempt[-lines:]
    if attempts and attempts[0][1]:
        return str(attempts[0][0]), attempts[0][1][-lines:]
    output = run.run_dir / "slurm.out"
    text = output.read_text(errors="replace").splitlines() if output.exists() else []
    return str(output), text[-lines:]


def status_text(run: QueuedRun) -> str:
    job = slurm.job_states([str(run.job_id)]).get(str(run.job_id))
    record, queue = run.record, run.queue
    fields = [
        ("run", run.name),
        ("experiment", str(record.get("experiment"))),
        ("job", str(run.job_id)),
        ("state", run_state(run, job)),
        ("exit code", str(record.get("exit_code"))),
        ("attempts", str(record.get("attempts", 0))),
        ("preempted", f"{int(queue.get('preemptions', 0))} time(s)"),
        ("retries", f"{int(queue.get('retries_used', 0))} of {int(queue.get('retries', 0))} used"),
        ("nodes", str(job.nodelist if job is not None and job.nodelist else " ".join(record.get("hosts") or []))),
        ("mode", str(queue.get("mode"))),
        ("elapsed", job.elapsed if job is not None and job.state in LIVE_STATES else _elapsed(record)),
        ("run dir", str(run.run_dir)),
    ]
    if job is not None and job.state == "PENDING":
        fields.append(("reason", job.reason))
    width = max(len(name) for name, _ in fields)
    text = "".join(f"{name.ljust(width)}  {value}\n" for name, value in fields)
    if record.get("status") == "failed" and (job is None or job.state not in LIVE_STATES):
        where, tail = failure_tail(run)
        text += f"--- the end of {where}:\n" + "".join(f"{line}\n" for line in tail)
    return text
