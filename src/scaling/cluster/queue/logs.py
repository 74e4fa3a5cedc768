"""``scaling queue logs RUN [-f] [--rank R]``: a rank's log (every attempt), and with ``-f`` what it appends
until the job ends. Following is bounded by the job: it stops once Slurm no longer has the job running or
pending, so a script that follows a run never hangs on a run that is over."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

from scaling.cluster.queue import slurm
from scaling.cluster.queue.listing import LIVE_STATES
from scaling.cluster.queue.runs import QueuedRun

__all__ = ["show_logs"]

POLL_S = 0.5


def _copy_new(path: Path, offset: int, out: TextIO) -> int:
    if not path.exists():
        return offset
    with path.open("rb") as handle:
        handle.seek(offset)
        data = handle.read()
    if data:
        out.write(data.decode(errors="replace"))
        out.flush()
    return offset + len(data)


def _job_live(run: QueuedRun) -> bool:
    job = slurm.job_states([str(run.job_id)]).get(str(run.job_id))
    return job is not None and job.state in LIVE_STATES


def show_logs(run: QueuedRun, rank: int, follow: bool, out: TextIO = sys.stdout) -> int:
    path = run.paths.log(rank)
    if not path.exists() and not (follow and _job_live(run)):
        print(f"scaling queue logs: run {run.name} has no log of rank {rank} yet ({path})", file=sys.stderr)
        return 1
    offset = _copy_new(path, 0, out)
    while follow and _job_live(run):
        time.sleep(POLL_S)
        offset = _copy_new(path, offset, out)
    _copy_new(path, offset, out)
    return 0
