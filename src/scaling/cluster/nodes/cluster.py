"""The project's hosts as :class:`~.ssh.Node` objects, and the bash preamble every remote step starts with.

The preamble fixes where the project lives on a node (``$BASE``: ``SCALING_NODE_DIR`` from the node's
login environment, else ``~/<node_dir>``, then the project name) and how to become root for installs:
nothing when the SSH user is root, else ``sudo -n`` (non-interactive: a sudo that wants a password fails
at once with a clear message instead of hanging the call).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from scaling.cluster.nodes.ssh import Node
from scaling.experiment.project import ProjectConfig

__all__ = ["Cluster", "Row"]

STATUSES = ("ok", "changed", "unchanged", "failed", "skipped")


@dataclass(frozen=True)
class Row:
    """One line of the closing table: on ``host``, ``check`` ended ``status`` (one of STATUSES)."""

    host: str
    check: str
    status: str
    detail: str

    @property
    def failed(self) -> bool:
        return self.status == "failed"


@dataclass(frozen=True)
class Cluster:
    root: Path
    config: ProjectConfig
    nodes: tuple[Node, ...]

    @classmethod
    def from_project(cls, root: Path, config: ProjectConfig, connect_timeout: float = 10) -> Cluster:
        identity = None
        if config.ssh_identity is not None:
            identity = Path(config.ssh_identity).expanduser()
            if not identity.is_absolute():
                identity = root / identity
        known = root / config.known_hosts
        nodes = tuple(Node(host, config.port, config.user, identity, known, connect_timeout) for host in config.hosts)
        return cls(root, config, nodes)

    def preamble(self) -> str:
        """Bash lines that set ``BASE`` (the project's folder on the node), ``PY`` and ``SUDO``."""
        return (
            "set -euo pipefail\n"
            f'BASE="${{SCALING_NODE_DIR:-$HOME/{shlex.quote(self.config.node_dir)}}}"/'
            f"{shlex.quote(self.config.name)}\n"
            f"PY={shlex.quote(self.config.node_python)}\n"
            'if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo -n"; fi\n'
        )
