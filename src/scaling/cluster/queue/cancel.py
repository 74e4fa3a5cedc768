"""``scaling queue cancel RUN``: cancel exactly that run's job (never a run whose name merely contains RUN).

The run's marker is written before ``scancel``, so a running job's last step records ``cancelled`` rather
than ``preempted`` for the SIGTERM Slurm sends; the record says ``cancelled`` at once either way.
"""

from __future__ import annotations

from scaling.cluster.queue import slurm
from scaling.cluster.queue.listing import LIVE_STATES
from scaling.cluster.queue.runs import CANCEL_MARKER, QueuedRun
from scaling.experiment.records import end_attempt, read_record, write_json_atomic

__all__ = ["cancel_run"]


def cancel_run(run: QueuedRun) -> str:
    """Cancel ``run``; returns what was done, in words. A run that already ended is left as it is."""
    job_id = str(run.job_id)
    job = slurm.job_states([job_id]).get(job_id)
    if job is None or job.state not in LIVE_STATES:
        status = run.record.get("status")
        return f"run {run.name} (job {job_id}) is not queued or running any more ({status}); nothing cancelled"
    (run.run_dir / CANCEL_MARKER).write_text(job_id + "\n", encoding="utf-8")
    slurm.cancel(job_id)
    record = read_record(run.run_dir)  # the job may have written it since
    if record.get("status") == "cancelled":
        pass
    elif record.get("status") == "running":
        record = end_attempt(record, "cancelled", None)
    else:
        record = {**record, "status": "cancelled"}
    write_json_atomic(run.paths.record, record)
    return f"run {run.name}: job {job_id} cancelled"
