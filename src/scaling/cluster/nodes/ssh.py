"""Running scripts on a node with the OpenSSH client: pinned host keys, no prompts, a timeout on every call.

A remote step is a bash script sent as ``bash -c SCRIPT`` (the script is code, never a secret); anything
secret (a key) goes in on the session's stdin, so it never appears in a process list or a log. Each call
is ``BatchMode=yes`` (no password or passphrase prompt can hang a thread), ``ConnectTimeout`` bounds the
connection and the subprocess timeout bounds the whole call. Host keys are checked strictly against the
project's known_hosts (:mod:`.known_hosts` pins them on first contact).
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from scaling.cluster.nodes import known_hosts

__all__ = ["Node", "Result", "SshError", "remote_command", "run", "ssh_argv"]


class SshError(RuntimeError):
    """The node could not be reached, or the call timed out (the message names the host)."""


@dataclass(frozen=True)
class Node:
    """How to reach one host."""

    host: str
    port: int
    user: str | None
    identity: Path | None
    known_hosts: Path
    connect_timeout: float = 10

    @property
    def destination(self) -> str:
        return self.host if self.user is None else f"{self.user}@{self.host}"


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def last_line(self) -> str:
        lines = self.stdout.strip().splitlines()
        return lines[-1].strip() if lines else ""

    def error_line(self) -> str:
        """The last line of stderr (where bash scripts and OpenSSH say what went wrong), squeezed."""
        lines = [line for line in self.stderr.strip().splitlines() if line.strip()]
        return " ".join(lines[-1].split()) if lines else f"exit status {self.returncode}"


def ssh_argv(node: Node) -> list[str]:
    """``ssh`` and its options for ``node`` (without the remote command)."""
    argv = [
        "ssh",
        "-p", str(node.port),
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={node.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "UpdateHostKeys=no",
        "-o", f"ConnectTimeout={max(1, int(node.connect_timeout))}",
        "-o", "ServerAliveInterval=5",
        "-o", "ServerAliveCountMax=3",
        "-o", "LogLevel=ERROR",
    ]  # fmt: skip
    if node.identity is not None:
        argv += ["-i", str(node.identity), "-o", "IdentitiesOnly=yes"]
    return [*argv, node.destination]


def remote_command(script: str, *args: str) -> str:
    """The remote command line that runs ``script`` in bash with positional ``args`` ($1, $2, ...)."""
    return shlex.join(["bash", "-c", script, "scaling-node", *args])


def _classify(node: Node, result: Result) -> None:
    """Raise when OpenSSH itself failed (exit 255): a changed host key, or no connection."""
    if result.returncode != 255:
        return
    text = result.stderr
    if "Host key verification failed" in text or "HOST IDENTIFICATION HAS CHANGED" in text:
        raise known_hosts.HostKeyError(
            known_hosts.mismatch_message(node.known_hosts, node.host, node.port, node.connect_timeout)
        )
    if text.lstrip().startswith("ssh:") or "Permission denied" in text or "Connection" in text:
        raise SshError(f"{node.host}: cannot connect: {result.error_line()}")


def run(node: Node, script: str, *args: str, stdin: str | bytes | None = None, timeout: float = 120) -> Result:
    """Run ``script`` on ``node`` (stdin fed from ``stdin``, or nothing) and return what it printed."""
    data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
    try:
        done = subprocess.run(
            [*ssh_argv(node), remote_command(script, *args)],
            input=data,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise SshError(f"{node.host}: no answer within {timeout:g} s") from None
    result = Result(done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace"))
    _classify(node, result)
    return result


def popen(node: Node, script: str, *args: str) -> subprocess.Popen[str]:
    """``script`` started on ``node`` with its stdout and stderr as pipes (for streaming output)."""
    return subprocess.Popen(
        [*ssh_argv(node), remote_command(script, *args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )


def classify(node: Node, returncode: int, stderr: str) -> None:
    """:func:`_classify` for a process started with :func:`popen`."""
    _classify(node, Result(returncode, "", stderr))
