"""Run records: one directory per run, ``RUNS_DIR/EXPERIMENT/RUN_NAME/``, that says what ran and how it ended.

A run directory holds::

    record.json        experiment, run name, resolved params, seed, git commit and dirty flag, command,
                       hosts, nproc, started/ended, status, exit code, attempts (and each attempt's history)
    params.json        the resolved, typed parameters (what every rank runs with)
    pip-freeze.txt     the Python environment of the launching machine
    logs/rank_N.log    everything rank N printed, every attempt appended
    metrics.jsonl      metrics the experiment logs (``scaling.experiment.metrics``)
    checkpoints/       what ``model.save(current_run().checkpoint_dir, ...)`` writes

The record is the contract with everything that reads runs later (the generated workflows, the queue, run
reports), so it is written atomically (temporary file, then rename) and its statuses are a closed set.
A run name is reused on purpose: an unfinished run (running, failed, cancelled, preempted, queued) resumes in its
own directory from its newest checkpoint; a completed run is never written into again, and
``--force-new`` then starts a new run beside it under a suffixed name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, get_args

__all__ = [
    "RESUMABLE",
    "STATUSES",
    "RecordError",
    "RunPaths",
    "RunPlan",
    "RunStatus",
    "begin_attempt",
    "check_run_name",
    "default_run_name",
    "end_attempt",
    "hold_run_lock",
    "last_checkpoint",
    "now_iso",
    "plan_run",
    "read_record",
    "write_json_atomic",
]

# "queued": submitted to the scheduler (`scaling queue submit`), no attempt running yet.
RunStatus = Literal["running", "completed", "failed", "cancelled", "preempted", "queued"]
STATUSES: tuple[RunStatus, ...] = get_args(RunStatus)
# Everything but "completed": a run that did not finish (it crashed, was stopped, or its launcher vanished
# while it was "running") is continued under its name rather than started over.
RESUMABLE: frozenset[RunStatus] = frozenset(STATUSES) - {"completed"}
RECORD_VERSION = 1

_RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")


class RecordError(ValueError):
    """A run name or run directory that cannot be used as asked (the message names the run and why)."""


@dataclass(frozen=True)
class RunPaths:
    """The files of one run directory (see the module docstring)."""

    run_dir: Path

    @property
    def record(self) -> Path:
        return self.run_dir / "record.json"

    @property
    def params(self) -> Path:
        return self.run_dir / "params.json"

    @property
    def pip_freeze(self) -> Path:
        return self.run_dir / "pip-freeze.txt"

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    def log(self, rank: int) -> Path:
        return self.logs / f"rank_{rank}.log"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def lock(self) -> Path:
        return self.run_dir / ".lock"


def now_iso() -> str:
    """Local time with its UTC offset, to the second: unambiguous, and what the user's clock said."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def check_run_name(name: str) -> str:
    """``name`` if it can name a directory on any node (``[A-Za-z0-9._-]``, not ``.``/``..``), else an error."""
    if not _RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise RecordError(f"run name {name!r}: use only letters, digits, '.', '_' and '-'")
    return name


def default_run_name(experiment: str, now: datetime | None = None) -> str:
    """``EXPERIMENT-YYYYmmdd-HHMMSS`` in local time."""
    return f"{experiment}-{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to a temporary file beside ``path`` and rename it into place, so a reader (or a
    crash) never sees half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(scratch, path)


def read_record(run_dir: Path) -> dict[str, Any]:
    """The record of ``run_dir``; a missing or unreadable one is a ``RecordError`` naming the file."""
    path = RunPaths(run_dir).record
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecordError(f"{run_dir} exists but has no record.json: not a run directory, left as it is") from None
    except (OSError, ValueError) as exc:
        raise RecordError(f"{path} is unreadable ({exc}): the run cannot be resumed") from None
    if not isinstance(record, dict) or record.get("status") not in STATUSES:
        raise RecordError(f"{path} has no valid status (expected one of {', '.join(STATUSES)})")
    return record


@dataclass(frozen=True)
class RunPlan:
    """What ``scaling run`` does: start ``run_name`` in ``run_dir``, or resume it (``previous`` is its record)."""

    run_name: str
    run_dir: Path
    previous: dict[str, Any] | None

    @property
    def resume(self) -> bool:
        return self.previous is not None


def _free_name(experiment_dir: Path, base: str) -> str:
    """``base``, or ``base-2``, ``base-3``... : the first that names no directory yet."""
    if not (experiment_dir / base).exists():
        return base
    suffix = 2
    while (experiment_dir / f"{base}-{suffix}").exists():
        suffix += 1
    return f"{base}-{suffix}"


def plan_run(experiment_dir: Path, experiment: str, run_name: str | None, *, force_new: bool = False) -> RunPlan:
    """Where a run of ``experiment`` named ``run_name`` goes (``experiment_dir`` = ``RUNS_DIR/EXPERIMENT``).

    No name: a new ``EXPERIMENT-YYYYmmdd-HHMMSS`` run. A name that is new: a new run. The name of an
    unfinished run: resume it. The name of a completed run: an error. With ``force_new`` the name of any
    existing run starts a new run beside it, ``NAME-2`` (``-3``...). Reads only; nothing is created.
    """
    if run_name is None:
        name = _free_name(experiment_dir, default_run_name(experiment))
        return RunPlan(name, experiment_dir / name, None)
    check_run_name(run_name)
    run_dir = experiment_dir / run_name
    if not run_dir.exists():
        return RunPlan(run_name, run_dir, None)
    if force_new:
        name = _free_name(experiment_dir, run_name)
        return RunPlan(name, experiment_dir / name, None)
    record = read_record(run_dir)
    if record.get("experiment") not in (None, experiment):
        raise RecordError(f"{run_dir} is a run of experiment {record.get('experiment')!r}, not {experiment!r}")
    if record["status"] not in RESUMABLE:
        raise RecordError(
            f"run {run_name!r} of experiment {experiment!r} already completed ({run_dir}); "
            "choose another --run-name, or pass --force-new to start a new run beside it"
        )
    return RunPlan(run_name, run_dir, record)


@contextlib.contextmanager
def hold_run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run's lock while its launcher lives: a second ``scaling run`` of the same run name is refused
    instead of training into the same checkpoints. The kernel drops the lock when the holder dies, so a run
    whose launcher was killed (its record still says "running") can be resumed."""
    path = RunPaths(run_dir).lock
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RecordError(f"run {run_dir.name!r} is in progress: another `scaling run` holds {path}") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``run_dir/checkpoints`` (``find_checkpoint``), or None when nothing
    was saved yet. Checkpoints that are there but none usable are an error, never a silent fresh start."""
    from scaling.core.checkpoint.discovery import find_checkpoint, holds_checkpoints  # torch: only when asked

    checkpoints = RunPaths(run_dir).checkpoints
    if not holds_checkpoints(checkpoints):
        return None
    return find_checkpoint(checkpoints)


def begin_attempt(
    previous: Mapping[str, Any] | None,
    *,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    seed: int,
    git: Mapping[str, Any],
    command: list[str],
    hosts: list[str],
    nproc: int,
) -> dict[str, Any]:
    """The record of a run whose next attempt starts now: a new record, or ``previous`` with one more attempt.

    ``started`` stays the first attempt's start; the command, git state, hosts and process count describe the
    attempt running now, and ``history`` keeps each attempt's own.
    """
    started = now_iso()
    attempt = {
        "started": started,
        "ended": None,
        "status": "running",
        "exit_code": None,
        "git": dict(git),
        "command": list(command),
        "hosts": list(hosts),
        "nproc": nproc,
    }
    history = list(previous.get("history", [])) if previous is not None else []
    return {
        "record_version": RECORD_VERSION,
        "experiment": experiment,
        "run_name": run_name,
        "params": dict(params),
        "seed": seed,
        "git": dict(git),
        "command": list(command),
        "hosts": list(hosts),
        "nproc": nproc,
        "started": previous.get("started", started) if previous is not None else started,
        "ended": None,
        "status": "running",
        "exit_code": None,
        "attempts": (int(previous.get("attempts", 0)) if previous is not None else 0) + 1,
        "history": [*history, attempt],
    }


def end_attempt(record: Mapping[str, Any], status: RunStatus, exit_code: int | None) -> dict[str, Any]:
    """``record`` with the running attempt ended now with ``status`` and ``exit_code``."""
    if status not in STATUSES:
        raise ValueError(f"status {status!r}: expected one of {', '.join(STATUSES)}")
    ended = now_iso()
    history = [dict(entry) for entry in record.get("history", [])]
    if history:
        history[-1].update(ended=ended, status=status, exit_code=exit_code)
    return {**record, "ended": ended, "status": status, "exit_code": exit_code, "history": history}
