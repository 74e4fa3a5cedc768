"""Each rank's output in ``logs/rank_N.log``; rank 0's also on the console, as it is written.

The redirection is done on the file descriptors, not on ``sys.stdout``, so everything a rank prints ends
up in its log: Python's prints and tracebacks, ``logging``, and what C++ code (torch, gloo, NCCL) writes.
A rank that shows its output (rank 0) writes into a pipe that a thread copies to both the log and the
original standard output; the others write straight into their log file. Logs are opened for appending:
a resumed run adds its attempt below the earlier ones, after a header line naming the attempt.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["attempt_header", "last_attempt", "rank_output"]

_ATTEMPT_MARK = "--- attempt "
_CHUNK = 65536
_DRAIN_S = 10.0  # how long the end of a run waits for the copying thread to write the last output


def attempt_header(attempt: object, run_name: str, rank: int, started: str) -> str:
    """The line that opens each attempt's part of a rank log."""
    return f"{_ATTEMPT_MARK}{attempt} of run {run_name}, rank {rank}, started {started}\n"


def last_attempt(log_path: Path) -> list[str]:
    """The lines of ``log_path`` written by the latest attempt (after its header); [] when there is no log."""
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    starts = [i for i, line in enumerate(lines) if line.startswith(_ATTEMPT_MARK)]
    return lines[starts[-1] + 1 :] if starts else lines


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _copy(source: int, targets: tuple[int, ...]) -> None:
    """Copy ``source`` into every target until the write end is closed; a target that fails (a closed console)
    is dropped, the others keep getting the output."""
    live = list(targets)
    while True:
        try:
            data = os.read(source, _CHUNK)
        except OSError:
            return
        if not data:
            return
        for fd in list(live):
            try:
                _write_all(fd, data)
            except OSError:
                live.remove(fd)


@contextlib.contextmanager
def rank_output(log_path: Path, *, console: bool, header: str = "") -> Iterator[None]:
    """Send this process's stdout and stderr to ``log_path`` (appended), and also to the console when
    ``console``, until the block ends; ``header`` is written to the log first."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    if header:
        _write_all(log_fd, header.encode())
    saved = (os.dup(1), os.dup(2))
    thread: threading.Thread | None = None
    if console:
        read_fd, write_fd = os.pipe()
        thread = threading.Thread(target=_copy, args=(read_fd, (log_fd, saved[0])), name="rank-output", daemon=True)
        thread.start()
        target = write_fd
    else:
        target = log_fd
    os.dup2(target, 1)
    os.dup2(target, 2)
    # Line by line, as on a terminal: a rank that dies mid-run leaves everything it printed, and the console
    # follows the run (the streams were block-buffered when standard output was not a terminal).
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        if thread is not None:
            os.close(target)  # the last write end besides fds 1 and 2, just restored: the thread sees the end
            thread.join(_DRAIN_S)
        # A thread still copying (a child process of the experiment holds the pipe open) keeps its descriptors;
        # closing them under it could hand their numbers to new files it would then write into.
        if thread is None or not thread.is_alive():
            for fd in (*saved, log_fd, *([read_fd] if thread is not None else [])):
                os.close(fd)
