"""A private Slurm (munged, slurmctld, one slurmd per node) in a scratch directory, for the queue tests.

Its nodes ``n1``, ``n2``... are all this machine: each has its own slurmd (``slurmd -N NAME``, which Debian's
build supports), port, spool, pid and log file, and its address (``NodeHostname``) is this host, so a job
of ``--nodes 2`` really runs one task on each slurmd and its torchruns rendezvous across them.

Nothing of the machine's own Slurm configuration is used: the daemons read ``DIR/slurm.conf`` (free ports,
state, spool, logs and pid files under ``DIR``) and authenticate through a munged with its own key and
socket. Commands reach this cluster through ``SLURM_CONF`` in their environment, which is how the tests
point ``scaling queue`` at it. :meth:`SlurmCluster.stop` kills the daemons by their pid files and waits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("slurmctld", "munged")  # stopped in this order, after the slurmds


class SlurmUnavailable(RuntimeError):
    """The Slurm or munge binaries are not installed, or the daemons did not come up (the message says why)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 // 2  # half of it: slurmd refuses a node with more than it has
    return 1024


@dataclass
class SlurmCluster:
    root: Path
    host: str  # this machine's short name: every node's address
    cpus: int  # of each node
    nodes: int = 2

    @property
    def node_names(self) -> list[str]:
        return [f"n{i + 1}" for i in range(self.nodes)]

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self) -> dict[str, str]:
        """This process's environment pointed at the private cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, env=self.env(), capture_output=True, text=True, timeout=timeout, check=False)

    def queue(self, project: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``scaling queue ARGS`` run in ``project``, pointed at this cluster."""
        command = [sys.executable, "-m", "scaling.cli.main", "queue", *args]
        return subprocess.run(
            command, cwd=project, env=self.env(), capture_output=True, text=True, timeout=timeout, check=False
        )

    def pid_file(self, daemon: str) -> Path:
        return self.root / f"{daemon}.pid"

    def write_config(self) -> None:
        root = self.root
        munge = root / "munge"
        memory = _memory_mb() // self.nodes
        node_lines = [
            f"NodeName={name} NodeHostname={self.host} Port={_free_port()} CPUs={self.cpus} RealMemory={memory}"
            for name in self.node_names
        ]
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=scalingtest",
                    f"SlurmctldHost={self.host}",
                    f"SlurmctldPort={_free_port()}",
                    "AuthType=auth/munge",
                    f"AuthInfo=socket={munge}/munge.socket",
                    "CredType=cred/munge",
                    f"StateSaveLocation={root}/state",
                    f"SlurmdSpoolDir={root}/spool/%n",
                    f"SlurmctldPidFile={self.pid_file('slurmctld')}",
                    f"SlurmdPidFile={root}/slurmd.%n.pid",
                    f"SlurmctldLogFile={root}/log/slurmctld.log",
                    f"SlurmdLogFile={root}/log/slurmd.%n.log",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "SchedulerType=sched/backfill",
                    "SchedulerParameters=bf_interval=1",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "ReturnToService=2",
                    "MpiDefault=none",
                    "KillWait=10",
                    "MinJobAge=300",
                    "InactiveLimit=0",
                    *node_lines,
                    f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def start(self, timeout: float = 30) -> None:
        for binary in ("munged", "slurmctld", "slurmd", "sbatch"):
            if shutil.which(binary) is None and not Path(f"/usr/sbin/{binary}").exists():
                raise SlurmUnavailable(f"{binary} is not installed (Debian: apt-get install slurm-wlm munge)")
        root = self.root
        for sub in ("munge", "state", "log", *(f"spool/{name}" for name in self.node_names)):
            (root / sub).mkdir(parents=True, exist_ok=True)
        munge = root / "munge"
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        munge.chmod(0o700)
        self.write_config()
        self._daemon(
            "munged", f"--key-file={key}", f"--socket={munge}/munge.socket", f"--pid-file={self.pid_file('munged')}",
            f"--log-file={root}/log/munged.log", f"--seed-file={munge}/munge.seed", "-f",
        )  # fmt: skip
        self._daemon("slurmctld", "-c", "-f", str(self.conf))
        for name in self.node_names:
            self._daemon("slurmd", "-N", name, "-f", str(self.conf), pid_name=f"slurmd.{name}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%T", timeout=10).stdout.split()
            if len(states) == self.nodes and all(state == "idle" for state in states):
                return
            time.sleep(0.3)
        logs = "\n".join(p.read_text(errors="replace")[-1500:] for p in sorted((root / "log").glob("*.log")))
        raise SlurmUnavailable(f"the private Slurm did not come up within {timeout:.0f} s:\n{logs}")

    def _daemon(self, name: str, *args: str, pid_name: str | None = None) -> None:
        binary = shutil.which(name) or f"/usr/sbin/{name}"
        done = subprocess.run([binary, *args], env=self.env(), capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise SlurmUnavailable(f"{name} did not start (exit {done.returncode}): {done.stderr.strip()}")
        deadline = time.monotonic() + 10
        while not self.pid_file(pid_name or name).exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self, timeout: float = 15) -> None:
        """Kill every daemon (its pid file's process only) and wait until each is gone."""
        for name in [*(f"slurmd.{node}" for node in self.node_names), *DAEMONS]:
            try:
                pid = int(self.pid_file(name).read_text().strip())
            except (OSError, ValueError):
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
