"""``scaling nodes exec -- CMD``: one command on every host at once, each output line prefixed by its host.

Lines are printed as they arrive (a lock keeps them whole), stdout to stdout and stderr to stderr. The
exit status is that of the first host (in ``hosts`` order) that failed, or 1 when that host's status is
unusable (a signal, OpenSSH's own 255), so a script can test ``scaling nodes exec`` like the command itself.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import IO

from scaling.cluster.nodes import known_hosts, ssh
from scaling.cluster.nodes.checks import parallel, pin_all
from scaling.cluster.nodes.cluster import Cluster

__all__ = ["exec_all", "shell_command"]

_LOCK = threading.Lock()
# In the project's folder when setup put it there (else the home), without the preamble's strict mode.
_RUN = 'set +euo pipefail\ncd "$BASE/project" 2>/dev/null || cd "$HOME"\neval "$1"\n'


def shell_command(argv: Sequence[str]) -> str:
    """One argument is a shell command line as typed (``"cd x && make"``); several are quoted as words."""
    return argv[0] if len(argv) == 1 else shlex.join(argv)


def _pump(stream: IO[str], out: IO[str], host: str, width: int, keep: list[str] | None = None) -> None:
    for line in stream:
        if keep is not None:
            keep.append(line)
        with _LOCK:
            out.write(f"{host.ljust(width)} | {line if line.endswith(chr(10)) else line + chr(10)}")
            out.flush()


def exec_all(cluster: Cluster, argv: Sequence[str], timeout: float) -> tuple[int, list[str]]:
    """Run ``argv`` on every host; (the exit status to propagate, the failed hosts with their status)."""
    width = max(len(node.host) for node in cluster.nodes)
    failures = pin_all(cluster, lambda text: print(text, file=sys.stderr))
    command = shell_command(argv)

    def run_on(node: ssh.Node) -> int:
        if node.host in failures:
            with _LOCK:
                print(f"{node.host.ljust(width)} | {failures[node.host].detail}", file=sys.stderr)
            return 255
        process = ssh.popen(node, cluster.preamble() + _RUN, command)
        assert process.stdout is not None and process.stderr is not None
        errors: list[str] = []
        threads = [
            threading.Thread(target=_pump, args=(process.stdout, sys.stdout, node.host, width)),
            threading.Thread(target=_pump, args=(process.stderr, sys.stderr, node.host, width, errors)),
        ]
        for thread in threads:
            thread.start()
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
            with _LOCK:
                print(f"{node.host.ljust(width)} | timed out after {timeout:g} s", file=sys.stderr)
        for thread in threads:
            thread.join(timeout=10)
        try:
            ssh.classify(node, code, "".join(errors))
        except (ssh.SshError, known_hosts.HostKeyError) as exc:
            with _LOCK:
                print(f"{node.host.ljust(width)} | {exc}", file=sys.stderr)
        return code

    codes = parallel(cluster.nodes, run_on)
    failed = [f"{node.host} (exit {code})" for node, code in zip(cluster.nodes, codes, strict=True) if code != 0]
    first = next((code for code in codes if code != 0), 0)
    return (first if 0 < first < 255 else (1 if first else 0)), failed
