"""Queued runs on disk: finding a run by its exact name, and the ``queue`` part of its record.

A queued run's ``record.json`` is an ordinary run record (:mod:`scaling.experiment.records`) with one more
key, ``queue``: the job id, what was asked of Slurm (nodes, GPUs, mode, priority, time limit), how many
times it was preempted, and its retry budget for failures of another kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaling.experiment.loading import CommandError, LoadedProject
from scaling.experiment.records import RecordError, RunPaths, read_record

__all__ = ["CANCEL_MARKER", "QueuedRun", "find_run", "queued_runs"]

CANCEL_MARKER = ".cancel-requested"  # written by `scaling queue cancel` before scancel: the job ends as cancelled


@dataclass(frozen=True)
class QueuedRun:
    run_dir: Path
    record: dict[str, Any]

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def queue(self) -> dict[str, Any]:
        return dict(self.record.get("queue") or {})

    @property
    def job_id(self) -> str | None:
        job_id = self.queue.get("job_id")
        return str(job_id) if job_id is not None else None

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.run_dir)


def queued_runs(project: LoadedProject) -> list[QueuedRun]:
    """Every run of the project that went through the queue (has a job id), oldest submission first."""
    runs_dir = project.root / project.config.runs_dir
    found = []
    for record_path in sorted(runs_dir.glob("*/*/record.json")):
        try:
            record = read_record(record_path.parent)
        except RecordError:
            continue  # not ours to judge here; `scaling run` names it when it is used
        if isinstance(record.get("queue"), dict) and record["queue"].get("job_id") is not None:
            found.append(QueuedRun(record_path.parent, record))
    return sorted(found, key=lambda run: int(str(run.job_id)) if str(run.job_id).isdigit() else 0)


def find_run(project: LoadedProject, name: str) -> QueuedRun:
    """The queued run named exactly ``name`` (or ``EXPERIMENT/NAME``); never one whose name merely contains it."""
    experiment, _, run_name = name.rpartition("/")
    matches = [run for run in queued_runs(project) if run.name == run_name]
    if experiment:
        matches = [run for run in matches if run.run_dir.parent.name == experiment]
    if not matches:
        raise CommandError(f"no queued run named {name!r} in {project.root / project.config.runs_dir}")
    if len(matches) > 1:
        names = ", ".join(f"{run.run_dir.parent.name}/{run.name}" for run in matches)
        raise CommandError(f"run name {name!r} is in several experiments ({names}): name it as EXPERIMENT/RUN")
    return matches[0]
