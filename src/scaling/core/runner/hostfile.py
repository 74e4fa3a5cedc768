"""MPI-style hostfiles: one host per line, ``worker-0 slots=4``; ``#`` starts a comment."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from scaling.core.config import ConfigError

__all__ = ["Host", "parse_hostfile", "read_hostfile"]

_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.\-\[\]:@]+)(?:\s+slots\s*=\s*(?P<slots>\d+))?$")


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    slots: int | None  # processes this host runs; None when the file does not say


def parse_hostfile(text: str, source: str = "<hostfile>") -> list[Host]:
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
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read hostfile {path}: {exc.strerror or exc}") from None
    return parse_hostfile(text, str(path))
