"""Goodput: the fraction of a job's wall time that went into training that was kept.

Three things lose time: restarts, rollbacks and checkpoint stalls.

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

A rollback (``trainer.spikes`` policy ``rollback``) loses the same kind of stretch inside one attempt: from
the moment the run last stood at the checkpoint it reloads (after that checkpoint's save) to the moment the
reload is done and the first step after it starts. That is the discarded steps (trained again) plus the
reload. A checkpoint stall is the time the step loop spent blocked in a save: all of a synchronous save,
the host copy (and the wait for the save before) of an asynchronous one. Records carry the cumulative
``lost_to_rollbacks_s`` and ``lost_to_checkpoints_s``; a restarted attempt carries over those of the record
it resumed at (what came after it is already counted as lost to the restart). ``goodput`` is 1 minus all
three over ``wall_s``, the job's wall time so far.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaling.core.runner.restarts import JOB_START_ENV, restart_count

__all__ = ["GoodputClock", "carried_losses", "lost_since_previous_attempt"]


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


def carried_losses(path: Path, resumed_step: int, job_start: float) -> tuple[float, float]:
    """The rollback and checkpoint losses the previous attempt had when it logged ``resumed_step`` (or the
    newest step before it), from the metrics file at ``path``; zeros when it logged none."""
    records = [r for r in _records(path) if float(r["wall_time"]) >= job_start]
    if not records:
        return 0.0, 0.0
    attempt = max(int(r.get("restarts", 0)) for r in records)
    kept = [r for r in records if int(r.get("restarts", 0)) == attempt and int(r.get("step", 0)) <= resumed_step]
    if not kept:
        return 0.0, 0.0
    last = kept[-1]
    return float(last.get("lost_to_rollbacks_s", 0.0)), float(last.get("lost_to_checkpoints_s", 0.0))


@dataclass
class GoodputClock:
    """What the metrics rank adds to each record: ``goodput``, ``wall_s``, the time lost to restarts,
    rollbacks and checkpoints, ``restarts`` and ``wall_time``."""

    job_start: float  # time.time() of the launcher's start
    lost_s: float  # lost to restarts before this attempt started training
    restarts: int  # this attempt's number (torchrun's restart count)
    rollbacks_s: float = 0.0  # lost to rollbacks so far (this attempt's and those carried over)
    checkpoints_s: float = 0.0  # the step loop's time blocked in saves so far
    attempt_start: float = field(default_factory=time.time)  # when this attempt started training
    _reached: dict[int, float] = field(default_factory=dict)  # step -> when the loop last stood there

    def reached(self, step: int, now: float | None = None) -> None:
        """The loop stands at ``step`` (its step and any save are done)."""
        self._reached[step] = time.time() if now is None else now

    def checkpointed(self, step: int) -> None:
        """A checkpoint of ``step`` was saved: a rollback cannot go further back, forget older steps."""
        self._reached = {s: t for s, t in self._reached.items() if s >= step}

    def rolled_back(self, step: int, now: float | None = None) -> float:
        """The run was reloaded to ``step`` and trains on from ``now``; returns the seconds this rollback lost."""
        now = time.time() if now is None else now
        lost = max(0.0, now - self._reached.get(step, self.attempt_start))
        self.rollbacks_s += lost
        self._reached = {s: t for s, t in self._reached.items() if s < step}
        self._reached[step] = now
        return lost

    @contextmanager
    def saving(self) -> Iterator[None]:
        """Within: the step loop is blocked in a save; the time counts as lost to checkpoints."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.checkpoints_s += time.perf_counter() - start

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
        lost = rollbacks = checkpoints = 0.0
        if restarts > 0:
            if log_dir is not None:
                path = Path(log_dir) / "metrics.jsonl"
                lost = lost_since_previous_attempt(path, resumed_step, job_start, now)
                rollbacks, checkpoints = carried_losses(path, resumed_step, job_start)
            else:  # no record of the previous attempt: all the time before this one is lost
                lost = now - job_start
        clock = cls(job_start, lost, restarts, rollbacks, checkpoints, attempt_start=now)
        clock.reached(resumed_step, now)
        return clock

    def metrics(self, now: float | None = None) -> dict[str, float]:
        now = time.time() if now is None else now
        wall = now - self.job_start
        lost = self.lost_s + self.rollbacks_s + self.checkpoints_s
        goodput = 1.0 - lost / wall if wall > 0 else 1.0
        return {
            "goodput": min(1.0, max(0.0, goodput)),
            "wall_s": wall,
            "lost_to_restarts_s": self.lost_s,
            "lost_to_rollbacks_s": self.rollbacks_s,
            "lost_to_checkpoints_s": self.checkpoints_s,
            "restarts": float(self.restarts),
            "wall_time": now,
        }
