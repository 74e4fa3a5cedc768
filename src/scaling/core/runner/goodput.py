"""Goodput: the fraction of a job's wall time that went into training that was kept.

A restart loses two stretches of time: the steps the dead attempt trained after its last checkpoint
(they are trained again) and the time from its death to the new attempt's first step (detection,
shutdown, restart, loading). Both lie between the moment the previous attempt reached the resumed
checkpoint's step and the moment this attempt starts training, so that interval is what a restart costs.

Nothing is sent between attempts: the metrics file (``metrics.jsonl``, flushed every step) already is the
record of the previous attempt. Every record carries ``wall_time`` (when it was written), ``restarts``
(the attempt it came from) and the cumulative ``lost_to_restarts_s``; a restarted attempt reads the file
once when it starts (``GoodputClock.for_attempt``) and adds its own loss. The job's wall time runs from
the launcher's start (``SCALING_JOB_START``, set by ``scaling.core.runner.agent``; without it, from this
attempt's start).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaling.core.runner.restarts import JOB_START_ENV, restart_count

__all__ = ["GoodputClock", "lost_since_previous_attempt"]


def _records(path: Path) -> Iterator[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by the crash says nothing
        if isinstance(record, dict) and isinstance(record.get("wall_time"), (int, float)):
            yield record


def lost_since_previous_attempt(path: Path, resumed_step: int, job_start: float, now: float) -> float:
    """Seconds lost to all restarts of this job until ``now``, from the metrics file at ``path``.

    The previous attempt is the newest one with records written since ``job_start``. Its cumulative loss
    is carried over; its time is lost from when it logged the resumed step (the newest of its records at or
    before ``resumed_step``; when it logged none, from its first step's start) to ``now``.
    """
    records = [r for r in _records(path) if float(r["wall_time"]) >= job_start]
    if not records:
        return max(0.0, now - job_start)  # nothing of the previous attempts survived: all of it is lost
    attempt = max(int(r.get("restarts", 0)) for r in records)
    previous = [r for r in records if int(r.get("restarts", 0)) == attempt]
    carried = float(previous[-1].get("lost_to_restarts_s", 0.0))
    kept = [r for r in previous if int(r.get("step", 0)) <= resumed_step]
    if kept:
        since = float(kept[-1]["wall_time"])
    else:
        first = previous[0]
        since = float(first["wall_time"]) - float(first.get("step_time_s", 0.0))
    return carried + max(0.0, now - since)


@dataclass
class GoodputClock:
    """What the metrics rank adds to each record: ``goodput``, ``lost_to_restarts_s``, ``restarts``, ``wall_time``."""

    job_start: float  # time.time() of the launcher's start
    lost_s: float  # lost to restarts before this attempt started training
    restarts: int  # this attempt's number (torchrun's restart count)

    @classmethod
    def for_attempt(cls, log_dir: str | Path | None, resumed_step: int, now: float | None = None) -> GoodputClock:
        """The clock of this attempt, which starts training at ``now`` from ``resumed_step``; ``log_dir`` holds
        the metrics file (``logger.log_dir``)."""
        now = time.time() if now is None else now
        value = os.environ.get(JOB_START_ENV, "")
        try:
            job_start = min(float(value), now)
        except ValueError:
            job_start = now
        restarts = restart_count()
        lost = 0.0
        if restarts > 0:
            if log_dir is not None:
                lost = lost_since_previous_attempt(Path(log_dir) / "metrics.jsonl", resumed_step, job_start, now)
            else:  # no record of the previous attempt: all the time before this one is lost
                lost = now - job_start
        return cls(job_start, lost, restarts)

    def metrics(self, now: float | None = None) -> dict[str, float]:
        now = time.time() if now is None else now
        wall = now - self.job_start
        goodput = 1.0 - self.lost_s / wall if wall > 0 else 1.0
        return {
            "goodput": min(1.0, max(0.0, goodput)),
            "lost_to_restarts_s": self.lost_s,
            "restarts": float(self.restarts),
            "wall_time": now,
        }
