"""The worker side of clean errors: what a rank raises becomes one exit code and one report.

``run_as_worker`` turns an exception into exit code 2 (bad input: ``BAD_INPUT_ERRORS``) or 1 (anything
else) and a report for the launcher (see ``scaling.core.runner.reports``), which prints the first failure
once instead of one traceback per rank.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable

import torch.distributed as dist

from scaling.core.checkpoint import CheckpointError
from scaling.core.config import ConfigError
from scaling.core.data import DataFileError
from scaling.core.runner.reports import WorkerReport, report_dir, write_done, write_report

__all__ = ["BAD_INPUT_ERRORS", "exit_code_for", "one_line", "run_as_worker"]

# Errors that mean the user's input is wrong (config, data files, checkpoints): one line and exit code 2,
# no traceback. Everything else is a bug or a machine problem: exit code 1 with the traceback.
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, DataFileError)


def exit_code_for(exc: BaseException) -> int:
    return 2 if isinstance(exc, BAD_INPUT_ERRORS) else 1


def one_line(exc: BaseException) -> str:
    """The error as one line: a bad-input error's own message (it names what and where), else type: message."""
    text = str(exc) if isinstance(exc, BAD_INPUT_ERRORS) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


def _from_a_collective(exc: BaseException) -> bool:
    """Raised by a collective (gloo reports a lost or timed-out peer as a plain RuntimeError)."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or any(word in text for word in ("gloo", "NCCL", "c10d"))


def run_as_worker(
    body: Callable[[], int], prog: str, rank: int, *, one_line_errors: tuple[type[BaseException], ...] = ()
) -> int:
    """Run ``body`` (one rank's work) and return its exit code; an exception becomes 2 (bad input) or 1.

    Started by the scaling launcher, the error goes to the launcher's report directory and nothing is printed
    here: the launcher prints the first failure once. Started otherwise (one process, or a plain torchrun),
    the error is printed here: one line for bad input and for ``one_line_errors`` (errors whose message says
    all, like a diverged run), the traceback too for anything else.
    """
    directory = report_dir()
    try:
        code = body()
    except Exception as exc:
        code = exit_code_for(exc)
        says_all = code == 2 or isinstance(exc, one_line_errors)  # its message is the whole explanation
        message = " ".join(str(exc).split()) if says_all else one_line(exc)
        trace = "" if says_all else traceback.format_exc()
        if directory is None:
            where = "" if code == 2 else f"rank {rank}: "
            print(f"{trace}{prog}: {where}{message}", file=sys.stderr)
        else:
            collective = _from_a_collective(exc)
            write_report(directory, WorkerReport(rank, code, message, trace, time.time(), collective))
        return code
    if directory is not None and code == 0:
        write_done(directory, rank)
    return code
