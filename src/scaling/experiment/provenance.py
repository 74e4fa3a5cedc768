"""What a run record needs to reproduce a run: the project's git state, the Python environment, the hosts.

Each probe answers even when its tool is missing: a project that is not a git repository records
``{"commit": null, "dirty": null}``, and an environment without pip falls back to the installed
distributions' names and versions, so recording never stops a run from starting.
"""

from __future__ import annotations

import importlib.metadata
import socket
import subprocess
import sys
from pathlib import Path

__all__ = ["git_state", "pip_freeze", "run_hosts"]

_TIMEOUT_S = 60


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(root: Path) -> dict[str, str | bool | None]:
    """``{"commit": HEAD's sha or None, "dirty": bool or None}``; both None outside a git repository.

    Dirty means any change ``git status`` reports, untracked files included: an experiment file not yet
    committed changes what runs as much as an edited one. Ignored files (``runs/``, ``.scaling/``) do not count.
    """
    inside = _git(root, "rev-parse", "--is-inside-work-tree")
    if inside is None or inside.strip() != "true":
        return {"commit": None, "dirty": None}
    head = _git(root, "rev-parse", "--verify", "-q", "HEAD")
    status = _git(root, "status", "--porcelain")
    return {"commit": head.strip() if head else None, "dirty": None if status is None else bool(status.strip())}


def pip_freeze() -> str:
    """``pip freeze`` of this interpreter; without pip, ``name==version`` of each installed distribution."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "freeze", "--disable-pip-version-check"],
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S,
            check=False,
        )
        if done.returncode == 0:
            return done.stdout
    except (OSError, subprocess.TimeoutExpired):
        pass
    found = {
        f"{dist.metadata['Name']}=={dist.version}"
        for dist in importlib.metadata.distributions()
        if dist.metadata["Name"]
    }
    return "# pip is not available here: installed distributions instead\n" + "".join(
        f"{line}\n" for line in sorted(found, key=str.lower)
    )


def run_hosts() -> list[str]:
    """The hosts of a run started on this machine: this machine's name."""
    return [socket.gethostname()]
