"""Host-key pinning in a project-local known_hosts file (trust on first use, then strict).

The first contact with a host scans its keys with ``ssh-keyscan``, prints their fingerprints and records
them; every connection after that runs with ``StrictHostKeyChecking=yes`` against that file, so a changed
key is refused by OpenSSH itself. We never pass ``StrictHostKeyChecking=no``: a node that silently changed
its key is exactly what pinning is for. When OpenSSH refuses, :func:`mismatch_message` names the host
and both fingerprints so the operator can decide (and remove the old line if the change was expected).
"""

from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path

__all__ = ["HostKeyError", "fingerprints", "host_pattern", "is_known", "mismatch_message", "pin"]

_KEY_TYPES = "ed25519,ecdsa,rsa"
_LOCK = threading.Lock()  # hosts are pinned from several threads; appends must not interleave


class HostKeyError(RuntimeError):
    """A host's key could not be scanned, or differs from the pinned one (the message names the host)."""


def host_pattern(host: str, port: int) -> str:
    """How OpenSSH names ``host`` in known_hosts: bare on port 22, ``[host]:port`` otherwise."""
    return host if port == 22 else f"[{host}]:{port}"


def _run(args: list[str], timeout: float, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise HostKeyError(f"{args[0]} timed out after {timeout:g} s") from None


def fingerprints(key_lines: str, timeout: float = 10) -> list[str]:
    """SHA256 fingerprints (``TYPE SHA256:...``) of known_hosts-format ``key_lines``."""
    done = _run(["ssh-keygen", "-l", "-f", "-"], timeout, stdin=key_lines)
    out = []
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            out.append(f"{parts[-1].strip('()')} {parts[1]}")
    return out


def known_lines(known_hosts: Path, host: str, port: int, timeout: float = 10) -> str:
    """The lines of ``known_hosts`` that pin ``host:port`` ("" when none)."""
    if not known_hosts.exists():
        return ""
    done = _run(["ssh-keygen", "-F", host_pattern(host, port), "-f", str(known_hosts)], timeout)
    return "\n".join(line for line in done.stdout.splitlines() if line and not line.startswith("#"))


def is_known(known_hosts: Path, host: str, port: int) -> bool:
    return bool(known_lines(known_hosts, host, port))


def _why_unreachable(host: str, port: int, timeout: float) -> str:
    """Why nothing answered (ssh-keyscan says nothing when it cannot connect): refused, timed out, ..."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    return "no SSH server answered"


def scan(host: str, port: int, timeout: float) -> str:
    """The host's public keys in known_hosts format, from ``ssh-keyscan``."""
    done = _run(["ssh-keyscan", "-T", str(max(1, int(timeout))), "-p", str(port), "-t", _KEY_TYPES, host], timeout + 5)
    lines = "\n".join(line for line in done.stdout.splitlines() if line and not line.startswith("#"))
    if not lines:
        said = dict.fromkeys(" ".join(line.split()) for line in done.stderr.splitlines() if line.strip())
        detail = "; ".join(said) or _why_unreachable(host, port, timeout)
        raise HostKeyError(f"{host}:{port}: cannot read its host key ({detail})")
    return lines


def pin(known_hosts: Path, host: str, port: int, timeout: float) -> list[str] | None:
    """Record ``host``'s keys if it has none pinned yet; returns their fingerprints when it recorded them."""
    with _LOCK:
        if is_known(known_hosts, host, port):
            return None
    lines = scan(host, port, timeout)
    with _LOCK:
        if is_known(known_hosts, host, port):
            return None
        known_hosts.parent.mkdir(parents=True, exist_ok=True)
        with known_hosts.open("a", encoding="utf-8") as file:
            file.write(lines + "\n")
    return fingerprints(lines)


def mismatch_message(known_hosts: Path, host: str, port: int, timeout: float) -> str:
    """One line: the host, the pinned fingerprints, and the ones it presents now."""
    pinned = ", ".join(fingerprints(known_lines(known_hosts, host, port))) or "none"
    try:
        presented = ", ".join(fingerprints(scan(host, port, timeout))) or "none"
    except HostKeyError:
        presented = "unreadable"
    return (
        f"{host}: HOST KEY MISMATCH: pinned in {known_hosts}: {pinned}; the host presents: {presented}. "
        f"Refusing to connect. If the change is expected, remove the old key with "
        f"`ssh-keygen -R '{host_pattern(host, port)}' -f {known_hosts}` and run again."
    )
