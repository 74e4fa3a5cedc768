"""Idempotent setup steps: a bash script per step that looks before it changes anything.

Every step script ends by printing ``changed ...`` or ``unchanged ...`` as its last line, so the table
can say "nothing changed" on a second run without this side keeping any state. A step's ``stdin`` is
how secrets reach the node (never its ``args``, which end up on the remote command line).
"""

from __future__ import annotations

from dataclasses import dataclass

from scaling.cluster.nodes import known_hosts, ssh
from scaling.cluster.nodes.cluster import Cluster, Row
from scaling.cluster.nodes.ssh import Node

__all__ = ["Step", "run_steps"]


@dataclass(frozen=True)
class Step:
    name: str
    script: str
    args: tuple[str, ...] = ()
    stdin: bytes | None = None
    timeout: float = 600


def run_steps(cluster: Cluster, node: Node, steps: list[Step]) -> list[Row]:
    """Run ``steps`` on ``node`` in order; after a failure the rest are reported as skipped."""
    rows: list[Row] = []
    for index, step in enumerate(steps):
        try:
            result = ssh.run(node, cluster.preamble() + step.script, *step.args, stdin=step.stdin, timeout=step.timeout)
        except (ssh.SshError, known_hosts.HostKeyError) as exc:
            rows.append(Row(node.host, step.name, "failed", str(exc)))
        else:
            word, _, detail = result.last_line().partition(" ")
            if result.ok and word in ("changed", "unchanged"):
                rows.append(Row(node.host, step.name, word, detail.strip()))
            else:
                rows.append(Row(node.host, step.name, "failed", result.error_line()))
        if rows[-1].failed:
            rows += [Row(node.host, later.name, "skipped", f"after {step.name} failed") for later in steps[index + 1 :]]
            break
    return rows
