"""How a worker tells its launcher why it stopped: one small JSON file per rank in a per-run directory.

Every rank that fails would otherwise print its own traceback, and torchrun adds a summary of all of them;
the user reads the same error several times, mixed with the secondary errors of the ranks that lost their
peer. Instead the launcher (``scaling.core.runner.agent``) makes a directory, passes it to its workers in
``SCALING_REPORT_DIR``, and after the run prints the one report that explains the failure:

* ``rank{R}.error.json``: what rank R raised (message, exit code, traceback, when, whether it was an error
  of a collective, which usually follows from another rank's failure);
* ``rank{R}.done``: rank R returned normally (after a graceful stop too), so the launcher can tell a clean
  stop from a rank killed while it was still saving.

torchrun restarts the workers (``runner.max_restarts``) in the same launcher, so each attempt reports into
its own ``attempt{N}`` subdirectory (N: torchrun's ``TORCHELASTIC_RESTART_COUNT``) and the launcher reads only
the last one: an error of an earlier attempt never explains a later failure.

This module only reads and writes the files; it imports nothing heavy, so the launcher stays quick.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "REPORT_DIR_ENV",
    "RESTART_COUNT_ENV",
    "WorkerReport",
    "done_ranks",
    "read_reports",
    "report_dir",
    "write_done",
    "write_report",
]

REPORT_DIR_ENV = "SCALING_REPORT_DIR"
RESTART_COUNT_ENV = "TORCHELASTIC_RESTART_COUNT"  # set by torchrun in every worker: 0, 1, ... per restart


@dataclass(frozen=True)
class WorkerReport:
    """Why one rank stopped with an error."""

    rank: int
    exit_code: int  # 2: bad input (one line is enough), 1: anything else (the traceback matters)
    message: str  # one line: "ExceptionType: text" or the text of a bad-input error
    traceback: str  # empty for bad input
    time: float  # time.time() when it was caught: the earliest report is usually the root cause
    collective: bool  # raised by torch.distributed (often a consequence of another rank's failure)


def report_dir() -> Path | None:
    """The directory this process reports to (its attempt's), when it was started by the scaling launcher."""
    value = os.environ.get(REPORT_DIR_ENV)
    if not value:
        return None
    attempt = Path(value) / f"attempt{int(os.environ.get(RESTART_COUNT_ENV, '0') or 0)}"
    attempt.mkdir(parents=True, exist_ok=True)
    return attempt


def _last_attempt(directory: Path) -> Path:
    """The report directory of the newest attempt under the launcher's ``directory`` (itself when none)."""
    attempts = [p for p in directory.glob("attempt*") if p.is_dir() and p.name[len("attempt") :].isdigit()]
    return max(attempts, key=lambda p: int(p.name[len("attempt") :]), default=directory)


def write_report(directory: Path, report: WorkerReport) -> None:
    """Write ``report`` atomically (the launcher may read while ranks are still failing)."""
    target = directory / f"rank{report.rank}.error.json"
    partial = target.with_suffix(".partial")
    partial.write_text(json.dumps(asdict(report)), encoding="utf-8")
    os.replace(partial, target)


def write_done(directory: Path, rank: int) -> None:
    (directory / f"rank{rank}.done").write_text(str(time.time()), encoding="utf-8")


def read_reports(directory: Path) -> list[WorkerReport]:
    """All error reports in ``directory``, the most telling first.

    Errors a rank raised itself come before errors of collectives (those usually say only that a peer went
    away), and within each kind the earliest comes first.
    """
    reports = []
    for path in _last_attempt(directory).glob("rank*.error.json"):
        try:
            reports.append(WorkerReport(**json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, TypeError):
            continue  # a report that cannot be read explains nothing; the exit code still tells
    return sorted(reports, key=lambda r: (r.collective, r.time))


def done_ranks(directory: Path) -> set[int]:
    """The ranks of the newest attempt that returned normally."""
    return {int(path.name[len("rank") : -len(".done")]) for path in _last_attempt(directory).glob("rank*.done")}
