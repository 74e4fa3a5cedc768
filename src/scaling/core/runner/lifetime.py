"""Processes of one job share one lifetime: a process started by a launcher dies with that launcher.

``die_with_parent`` makes the kernel send SIGTERM to this process when its parent exits, however it exits
(``kill -9`` too). Every link of the chain sets it: torchrun (our ``agent``) dies with ``scaling train``,
each worker dies with torchrun. A worker that gets it stops as on any SIGTERM: the trainer finishes its
step, saves a checkpoint and returns, so nothing already trained is lost, and nothing trains on unwatched.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

__all__ = ["AGENT_PID_ENV", "die_with_parent"]

AGENT_PID_ENV = "SCALING_AGENT_PID"  # set by the agent: lets a worker notice its parent died before it asked
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(sig: signal.Signals = signal.SIGTERM, expected_parent: int | None = None) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits; returns whether it could (Linux).

    When the parent is not ``expected_parent`` (default: ``$SCALING_AGENT_PID``, when set) it died before
    this call, while this process was still importing torch: then ``sig`` is sent right away, as the kernel
    would have.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if expected_parent is None and os.environ.get(AGENT_PID_ENV, "").isdigit():
        expected_parent = int(os.environ[AGENT_PID_ENV])
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)
    return True
