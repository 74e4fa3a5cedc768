"""MPI-style hostfiles: one host per line, ``worker-0 slots=4``; ``#`` starts a comment.

The same file format as OpenMPI and DeepSpeed, so an existing cluster's hostfile works unchanged. The
order of the lines is the node-rank order, and the first host is the default rendezvous address.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from scaling.core.config import ConfigError

__all__ = ["Host", "parse_hostfile", "read_hostfile"]

# No '[' or ']': pdsh would expand a range like 'worker[0-3]' into several nodes, but here it is one line,
# so the node count and node ranks would disagree with what pdsh starts.
_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.\-:@]+)(?:\s+slots\s*=\s*(?P<slots>\d+))?$")


class Host(NamedTuple):
    """One line of a hostfile; a plain ``(name, slots)`` tuple to callers that unpack it."""

    name: str
    slots: int | None  # processes this host runs; None when the file does not say


def parse_hostfile(text: str, source: str = "<hostfile>") -> list[Host]:
    """The hosts of ``text`` in file order; each error is a ``ConfigError`` naming ``source:line``."""
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if match is None:
            raise ConfigError(f"{source}:{number}: expected 'HOST' or 'HOST slots=N', got {raw.strip()!r}")
        name = match["host"]
        if name in seen:
            raise ConfigError(f"{source}:{number}: host {name!r} is already listed on line {seen[name]}")
        slots = int(match["slots"]) if match["slots"] is not None else None
        if slots == 0:
            raise ConfigError(f"{source}:{number}: host {name!r} has slots=0")
        seen[name] = number
        hosts.append(Host(name, slots))
    if not hosts:
        raise ConfigError(f"{source}: no hosts listed")
    return hosts


def read_hostfile(path: Path) -> list[Host]:
    """``parse_hostfile`` of a file; an unreadable file is a ``ConfigError`` too."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read hostfile {path}: {exc.strerror or exc}") from None
    return parse_hostfile(text, str(path))
