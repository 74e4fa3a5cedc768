"""Real sshd "nodes" on loopback addresses (127.0.0.2, 127.0.0.3, ...) for the ``scaling nodes`` tests.

Each node is its own ``/usr/sbin/sshd -D`` with its own config, host key and pid file, listening on one
shared free port of its own address, and accepting one generated client key. ``SetEnv`` gives each node
its own ``SCALING_NODE_DIR`` and ``HOME``, because they all share this machine's filesystem (and so a login
does not read this machine's root ``.bashrc``, whose pyenv set-up costs a second per call). Nothing outside the
temporary directory is touched, and :meth:`SshdNodes.stop` ends exactly the processes started here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Stand-ins for the service manager and the package database, first on the nodes' PATH, so that
# `nodes setup --slurm` runs its real scripts without restarting or installing anything on this machine:
# a "restart" is logged in the node's $HOME/restarts and marks the daemon running for `pgrep -x`; each node
# answers `hostname` with its own address (127-0-0-2), as separate machines would.
_FAKES = {
    "service": '#!/bin/sh\nunit="$1"; [ "$unit" = munge ] && unit=munged\necho "$1" >> "$HOME/restarts"\n'
    'touch "$HOME/running.$unit"\n',
    "systemctl": '#!/bin/sh\n[ "$1" = restart ] || exit 0\nexec service "$2" restart\n',
    "pgrep": '#!/bin/sh\n[ "$1" = -x ] && [ -e "$HOME/running.$2" ]\n',
    "hostname": '#!/bin/sh\nbasename "$(dirname "$HOME")" | tr . -\n',
    "dpkg-query": '#!/bin/sh\necho "install ok installed"\necho "install ok installed"\n',
}


def _fake_service_tools(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in _FAKES.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)


def free_port(addresses: list[str]) -> int:
    """A TCP port free on every one of ``addresses``."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for address in addresses[1:]:
                with socket.socket() as other:
                    other.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on all test addresses")


def _keygen(path: Path, comment: str) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".pub").unlink(missing_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True, timeout=30
    )


class SshdNodes:
    def __init__(self, workdir: Path, addresses: list[str]) -> None:
        self.workdir = workdir
        self.addresses = addresses
        self.port = free_port(addresses)
        self.client_key = workdir / "client_key"
        _keygen(self.client_key, "scaling-test-client")
        (workdir / "authorized_keys").write_text(self.client_key.with_name("client_key.pub").read_text())
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.fake_bin = workdir / "fake-bin"
        _fake_service_tools(self.fake_bin)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        for address in addresses:
            folder = workdir / address
            (folder / "home").mkdir(parents=True)
            _keygen(folder / "host_key", f"host-{address}")
            (folder / "sshd_config").write_text(
                f"ListenAddress {address}:{self.port}\n"
                f"HostKey {folder / 'host_key'}\n"
                f"PidFile {folder / 'sshd.pid'}\n"
                f"AuthorizedKeysFile {workdir / 'authorized_keys'}\n"
                "UsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "PermitRootLogin prohibit-password\nLogLevel ERROR\n"
                f"SetEnv SCALING_NODE_DIR={folder / 'home'} HOME={folder / 'home'} PATH={self.fake_bin}:{_PATH}\n"
            )
            self.start(address)

    def node_dir(self, address: str) -> Path:
        return self.workdir / address / "home"

    def start(self, address: str) -> None:
        config = self.workdir / address / "sshd_config"
        log = (self.workdir / address / "sshd.log").open("ab")
        self.processes[address] = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection((address, self.port), timeout=1).close()
                return
            except OSError:
                if self.processes[address].poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError(
            f"sshd on {address}:{self.port} did not start: {(self.workdir / address / 'sshd.log').read_text()}"
        )

    def stop_one(self, address: str) -> None:
        process = self.processes.pop(address, None)
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def new_host_key(self, address: str) -> None:
        """Give ``address`` a fresh host key and restart its sshd (what a reinstalled or spoofed node looks like)."""
        self.stop_one(address)
        _keygen(self.workdir / address / "host_key", f"host-{address}-new")
        self.start(address)

    def stop(self) -> None:
        for address in list(self.processes):
            self.stop_one(address)


def os_is_root() -> bool:
    return os.geteuid() == 0
