"""``scaling nodes setup --slurm``: Slurm on the project's hosts (controller on the first, ``slurmd`` on all).

The configuration is generated here from what the checks found on each node (short host name, CPUs,
memory, GPUs), so ``gres`` matches the hardware. One munge key, made once in ``.scaling/munge.key``,
reaches every node on stdin; a node whose packages, key and config files already match keeps its
daemons running (unchanged), otherwise the changed daemons restart. No accounting database:
``AccountingStorageType=accounting_storage/none``, so the queue works without slurmdbd.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from scaling.cluster.nodes.steps import Step
from scaling.experiment.project import ProjectConfig

__all__ = ["MUNGE_KEY", "gres_conf", "munge_key", "slurm_conf", "slurm_steps"]

MUNGE_KEY = ".scaling/munge.key"
MUNGE_KEY_BYTES = 1024

_PACKAGES = r"""
if dpkg-query -W -f='${Status}\n' slurm-wlm munge 2>/dev/null | grep -c "install ok installed" | grep -qx 2; then
  echo "unchanged slurm-wlm, munge installed"
else
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >&2
  echo "changed installed slurm-wlm, munge"
fi
"""

# "~/x" in scaling.yml is the SSH user's home on the node
_HOME_PATH = r"""
at_home() { case "$1" in "~/"*) printf '%s/%s' "$HOME" "${1#\~/}" ;; *) printf '%s' "$1" ;; esac; }
"""

_MUNGE = (
    _HOME_PATH
    + r"""
set -- "$(at_home "$1")"
new=$(mktemp)
trap 'rm -f "$new"' EXIT
cat > "$new"
if $SUDO cmp -s "$new" "$1"; then
  state=unchanged
else
  $SUDO mkdir -p "$(dirname "$1")"
  $SUDO install -o munge -g munge -m 0400 "$new" "$1"
  state=changed
fi
restart() {
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl enable --quiet "$1" && $SUDO systemctl restart "$1"
  else
    $SUDO service "$1" restart >&2
  fi
}
if [ "$state" = changed ] || ! pgrep -x munged >/dev/null; then restart munge; state=changed; fi
echo "$state $1 (the project's key)"
"""
)

_CONFIG = (
    _HOME_PATH
    + r"""
set -- "$1" "$2" "$3" "$(at_home "$4")"
state=unchanged
$SUDO mkdir -p "$4"
put() {
  if [ "$(cat "$2" 2>/dev/null)" != "$1" ]; then
    printf '%s\n' "$1" | $SUDO tee "$2" >/dev/null
    state=changed
  fi
}
put "$1" "$4/slurm.conf"
put "$2" "$4/gres.conf"
restart() {
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl enable --quiet "$1" && $SUDO systemctl restart "$1"
  else
    $SUDO service "$1" restart >&2
  fi
}
for daemon in $3; do
  if [ "$state" = changed ] || ! pgrep -x "$daemon" >/dev/null; then restart "$daemon"; state=changed; fi
done
echo "$state $4/slurm.conf, gres.conf; running: $3"
"""
)


def munge_key(root: Path) -> bytes:
    """The project's munge key (made once, ``0600``, in the git-ignored ``.scaling/``)."""
    path = root / MUNGE_KEY
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        scratch = path.with_name(f".munge.key.{os.getpid()}.tmp")
        descriptor = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(os.urandom(MUNGE_KEY_BYTES))
        os.replace(scratch, path)
    return path.read_bytes()


def _cluster_name(name: str) -> str:
    """Slurm wants a lower-case cluster name of letters, digits and '_'."""
    return re.sub(r"[^a-z0-9_]", "_", name.lower())[:40] or "scaling"


def slurm_conf(name: str, hosts: Sequence[str], facts: Mapping[str, Mapping[str, str]]) -> str:
    """``slurm.conf`` for ``hosts`` (the first is the controller) from each host's probe ``facts``.

    Raises ``ValueError`` when two hosts report the same short host name (cloned machines): Slurm could
    not tell their ``slurmd`` apart."""
    names = [facts[host].get("hostname", host) for host in hosts]
    twins = sorted({name for name in names if names.count(name) > 1})
    if twins:
        raise ValueError(f"hosts share the host name {', '.join(twins)}: slurmd finds its node by host name")
    first = facts[hosts[0]]
    lines = [
        "# written by scaling nodes setup --slurm: edit scaling.yml and run it again instead",
        f"ClusterName={_cluster_name(name)}",
        f"SlurmctldHost={first.get('hostname', hosts[0])}({hosts[0]})",
        "AuthType=auth/munge",
        "SlurmUser=slurm",
        "StateSaveLocation=/var/spool/slurmctld",
        "SlurmdSpoolDir=/var/spool/slurmd",
        "SlurmctldPidFile=/run/slurmctld.pid",
        "SlurmdPidFile=/run/slurmd.pid",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "ReturnToService=2",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "GresTypes=gpu",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "PreemptType=preempt/none",
        "# the queue requeues preempted and timed-out jobs itself (sbatch --requeue)",
        "JobRequeue=1",
    ]
    for host in hosts:
        node = facts[host]
        memory = max(1, int(int(node.get("mem_mb", "1") or 1) * 0.95))  # headroom: slurmd drains a node it finds short
        gpus = int(node.get("gpus", "0") or 0)
        gres = f" Gres=gpu:{gpus}" if gpus else ""
        node_name = node.get("hostname", host)
        lines.append(
            f"NodeName={node_name} NodeAddr={host} CPUs={node.get('cpus', '1')} RealMemory={memory}{gres} State=UNKNOWN"
        )
    lines.append("PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO")
    return "\n".join(lines)


def gres_conf(hosts: Sequence[str], facts: Mapping[str, Mapping[str, str]]) -> str:
    """``gres.conf``: each GPU node's ``/dev/nvidiaN`` files, as many as ``nvidia-smi`` listed."""
    lines = ["# written by scaling nodes setup --slurm"]
    for host in hosts:
        gpus = int(facts[host].get("gpus", "0") or 0)
        if gpus:
            files = "/dev/nvidia0" if gpus == 1 else f"/dev/nvidia[0-{gpus - 1}]"
            lines.append(f"NodeName={facts[host].get('hostname', host)} Name=gpu File={files}")
    return "\n".join(lines)


def slurm_steps(
    root: Path,
    config: ProjectConfig,
    facts: Mapping[str, Mapping[str, str]],
) -> dict[str, list[Step]]:
    """The Slurm steps per host, in order: packages, munge key (on stdin), config files and daemons."""
    key = munge_key(root)
    hosts = config.hosts
    conf, gres = slurm_conf(config.name, hosts, facts), gres_conf(hosts, facts)
    plan = {}
    for index, host in enumerate(hosts):
        daemons = "slurmctld slurmd" if index == 0 else "slurmd"
        plan[host] = [
            Step("slurm packages", _PACKAGES, timeout=1800),
            Step("munge key", _MUNGE, (config.munge_key_file,), stdin=key, timeout=120),
            Step("slurm config", _CONFIG, (conf, gres, daemons, config.slurm_conf_dir), timeout=300),
        ]
    return plan
