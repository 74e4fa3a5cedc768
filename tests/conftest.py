"""Session-wide checks: `make test` leaves no processes behind.

A test that starts processes (ranks of the distributed harness, data-loader workers, `scaling train` runs)
and does not stop them leaves them running, often hundreds of MB each, long after pytest has exited. At the
end of the session every process this pytest started (directly or not) must be gone; multiprocessing's own
helpers (the fork server, the resource tracker) are exempt, as they exit with pytest. Leftovers are killed
and the session fails, naming them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_HELPERS = (b"multiprocessing.forkserver", b"multiprocessing.resource_tracker")
_GRACE_S = 5.0  # processes being torn down by the last test's own cleanup


# The /proc walk is written out here rather than imported from tests/core/processes.py: this file must work on
# its own (tests/core/test_no_leftover_processes.py runs a copy of it in a scratch directory).
def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":  # a zombie has exited; only its parent has not reaped it yet
            parents[int(entry)] = int(fields[1])
    return parents


def _leftovers() -> dict[int, str]:
    """Processes started by this pytest (children, grandchildren...) that are still running, with commands."""
    parents = _parents()
    found, frontier = [], [os.getpid()]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    commands = {pid: _command(pid) for pid in [*found, *parents.values()]}
    leftovers = {}
    for pid in found:
        # A process forked by the fork server shares its command line: only the server itself is exempt.
        if _is_helper(commands[pid]) and not _is_helper(commands.get(parents[pid], b"")):
            continue
        if commands[pid]:
            leftovers[pid] = commands[pid].replace(b"\0", b" ").decode(errors="replace").strip()
    return leftovers


def _command(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _is_helper(command: bytes) -> bool:
    return any(helper in command for helper in _HELPERS)


@pytest.fixture(scope="session", autouse=True)
def no_processes_left_behind() -> Iterator[None]:
    yield
    if not Path("/proc/self/stat").exists():
        return  # no /proc (not Linux): nothing to check with
    deadline = time.monotonic() + _GRACE_S
    while (leftovers := _leftovers()) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not leftovers:
        return
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    listing = "\n".join(f"  {pid}: {command[:200]}" for pid, command in leftovers.items())
    pytest.fail(f"the tests left {len(leftovers)} processes running (now killed):\n{listing}", pytrace=False)
