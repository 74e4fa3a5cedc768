"""Pure construction of the command lines that start a run: no processes are started here.

One ``torch.distributed.run`` (PyTorch's elastic launcher, "torchrun", run by ``scaling.core.runner.agent``)
per node starts that node's processes and handles rendezvous, restarts and per-rank logs. What differs
between runners is only how that launcher gets started on each node:

* local: directly;
* pdsh: ``pdsh -w host0,host1 '<cd; export; torchrun --node-rank=%n ...>'`` (pdsh replaces %n by the
  node's position in the host list);
* pdsh_docker: the same, with torchrun inside ``docker run``;
* slurm: an sbatch script whose ``srun`` runs one launcher per node, each reading its node rank from
  ``$SLURM_NODEID``.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from scaling.core.config import ConfigError
from scaling.core.runner.config import DEFAULT_MASTER_PORT, RunnerConfig, RunnerType
from scaling.core.runner.hostfile import Host, read_hostfile

__all__ = ["RANK_LOGS", "LaunchPlan", "NodeCommand", "plan_launch"]

RANK_LOGS = "ranks"  # per-rank log files (runner.rank_logs) go to <logger.log_dir>/ranks/

# torchrun inside a process that dies with its parent and reports the first failure once (see its docstring).
_LAUNCHER = "scaling.core.runner.agent"


@dataclass(frozen=True)
class NodeCommand:
    """What one node runs, with its node rank filled in: the command as the remote shell receives it."""

    host: str
    node_rank: int
    command: str  # the shell command that runs on the host


@dataclass(frozen=True)
class LaunchPlan:
    """Everything a launch runs, as data: printed by a dry run, executed by ``launch``, compared by tests."""

    argv: list[str]  # what runs on this machine: torchrun, pdsh or sbatch
    nodes: list[NodeCommand] = field(default_factory=list)  # per node, fully expanded (pdsh runners)
    sbatch_script: str | None = None  # the job script (slurm); argv submits it

    def describe(self) -> str:
        """Human-readable listing of everything that would run (``--dry-run``)."""
        lines = ["# command run here:", shlex.join(self.argv)]
        for node in self.nodes:
            lines += [f"# node {node.node_rank} ({node.host}):", node.command]
        if self.sbatch_script is not None:
            lines += ["# sbatch script:", self.sbatch_script.rstrip("\n")]
        return "\n".join(lines) + "\n"


def _hosts(config: RunnerConfig) -> list[Host]:
    if config.hostsfile is not None:
        return read_hostfile(config.hostsfile)
    if config.hosts:
        return [Host(name, None) for name in config.hosts]
    return []


def _nproc_per_node(config: RunnerConfig, hosts: list[Host], n_nodes: int, world_size: int) -> int:
    if config.nproc_per_node is not None:
        nproc = config.nproc_per_node
    elif hosts and all(h.slots is not None for h in hosts):
        slots = {h.slots for h in hosts}
        if len(slots) != 1:
            raise ConfigError(f"runner.hostsfile: hosts have different slots {sorted(s or 0 for s in slots)}; "
                              "every node must run the same number of processes")  # fmt: skip
        nproc = slots.pop() or 1
    elif world_size % n_nodes == 0:
        nproc = world_size // n_nodes
    else:
        raise ConfigError(
            f"runner.nproc_per_node: world size {world_size} does not divide over {n_nodes} nodes; "
            "set nproc_per_node or change the number of hosts"
        )
    if nproc * n_nodes != world_size:
        raise ConfigError(
            f"runner.nproc_per_node: {n_nodes} node(s) x {nproc} processes = {nproc * n_nodes}, "
            f"but topology.world_size is {world_size}"
        )
    return nproc


def _script(config: RunnerConfig) -> list[str]:
    return (["-m"] if config.module else []) + [config.script, *config.script_args]


def _common_flags(config: RunnerConfig, log_dir: Path | None) -> list[str]:
    """Launcher flags every runner passes: restarts, and per-rank log files (also teed to the console)."""
    flags = [f"--max-restarts={config.max_restarts}"]
    if config.rank_logs:
        if log_dir is None:
            raise ConfigError("runner.rank_logs: per-rank logs go under logger.log_dir, which is not set")
        flags += [f"--log-dir={log_dir / RANK_LOGS}", "--tee=3"]  # 3: stdout and stderr of every local rank
    return flags


def _torchrun(python: str, launcher_args: list[str], config: RunnerConfig, log_dir: Path | None) -> str:
    """The launcher command on one node, as shell text.

    ``launcher_args`` are flags whose values need no quoting (numbers, host names) or must stay unquoted
    (pdsh's %n, Slurm's $SLURM_NODEID, expanded on the node itself); everything else is quoted.
    """
    head = [shlex.quote(python), "-m", _LAUNCHER, *launcher_args]
    flags = _common_flags(config, log_dir)
    return " ".join(head + [shlex.quote(flag) for flag in flags]) + " " + shlex.join(_script(config))


def _exports(config: RunnerConfig, env: Mapping[str, str]) -> list[str]:
    missing = [name for name in config.env_forward if name not in env]
    if missing:
        raise ConfigError(f"runner.env_forward: {missing} not set in this environment")
    return [f"export {name}={shlex.quote(env[name])}" for name in config.env_forward]


def plan_launch(
    config: RunnerConfig,
    world_size: int,
    *,
    python: str,
    cwd: str,
    env: Mapping[str, str],
    log_dir: str | Path | None = None,
) -> LaunchPlan:
    """The commands that start ``world_size`` processes as ``config`` says.

    ``log_dir`` is the run's ``logger.log_dir``: per-rank logs go to ``<log_dir>/ranks`` (with
    ``runner.rank_logs``), a Slurm job script to ``<log_dir>/<job_name>.sbatch``.
    """
    logs = Path(log_dir) if log_dir is not None else None
    if config.runner_type == RunnerType.LOCAL:
        nproc = _nproc_per_node(config, [], 1, world_size)
        if config.master_port == DEFAULT_MASTER_PORT and config.master_addr is None:
            rendezvous = ["--standalone"]  # the launcher picks a free port: no clash with another local run
        else:
            rendezvous = [f"--master-addr={config.master_addr or '127.0.0.1'}", f"--master-port={config.master_port}"]
        argv = [python, "-m", _LAUNCHER, "--nnodes=1", f"--nproc-per-node={nproc}", *rendezvous]
        return LaunchPlan(argv=argv + _common_flags(config, logs) + _script(config))

    hosts = _hosts(config)
    workdir = config.workdir or cwd
    exports = _exports(config, env)
    if config.runner_type == RunnerType.SLURM:
        return _plan_slurm(config, hosts, world_size, workdir, exports, logs)
    if not hosts:
        raise ConfigError(f"runner.hosts: runner_type '{config.runner_type.value}' needs hosts or a hostsfile")
    nproc = _nproc_per_node(config, hosts, len(hosts), world_size)
    master = config.master_addr or hosts[0].name
    launcher = _torchrun(
        config.python,
        [f"--nnodes={len(hosts)}", "--node-rank=%n", f"--nproc-per-node={nproc}", f"--master-addr={master}",
         f"--master-port={config.master_port}"],
        config,
        logs,
    )  # fmt: skip
    if config.runner_type == RunnerType.PDSH_DOCKER:
        launcher = _in_docker(config, launcher, workdir, env)
        remote = launcher
    else:
        remote = " && ".join([f"cd {shlex.quote(workdir)}", *exports, launcher])
    argv = ["pdsh", "-S", "-R", "ssh", "-f", "1024", "-w", ",".join(h.name for h in hosts), remote]
    nodes = [NodeCommand(h.name, i, remote.replace("%n", str(i))) for i, h in enumerate(hosts)]
    return LaunchPlan(argv=argv, nodes=nodes)


def _in_docker(config: RunnerConfig, launcher: str, workdir: str, env: Mapping[str, str]) -> str:
    docker = config.docker
    assert docker.image is not None
    args = (["sudo"] if docker.sudo else []) + ["docker", "run", "--rm", "--network=host", "--ipc=host"]
    if docker.gpus:
        args.append("--gpus=all")
    for mount in docker.mounts:
        args += ["-v", mount]
    for name in config.env_forward:
        args += ["-e", f"{name}={env[name]}"]
    args += ["-w", workdir, *docker.extra_args, docker.image, "bash", "-c", launcher]
    return shlex.join(args)


def _plan_slurm(
    config: RunnerConfig, hosts: list[Host], world_size: int, workdir: str, exports: list[str], log_dir: Path | None
) -> LaunchPlan:
    slurm = config.slurm
    if hosts:
        n_nodes = len(hosts)
        nproc = _nproc_per_node(config, hosts, n_nodes, world_size)
    else:  # Slurm picks the nodes: their number follows from the processes each one runs
        nproc_hint = config.nproc_per_node or slurm.gpus_per_node
        if not nproc_hint:
            raise ConfigError("runner.nproc_per_node: slurm needs nproc_per_node, slurm.gpus_per_node or hosts")
        if world_size % nproc_hint:
            raise ConfigError(
                f"runner.nproc_per_node: {nproc_hint} processes per node do not divide topology.world_size "
                f"({world_size})"
            )
        n_nodes, nproc = world_size // nproc_hint, nproc_hint
    header = ["#!/bin/bash", f"#SBATCH --job-name={slurm.job_name}", f"#SBATCH --nodes={n_nodes}",
              "#SBATCH --ntasks-per-node=1", f"#SBATCH --output={slurm.output}"]  # fmt: skip
    optional = {"--partition": slurm.partition, "--account": slurm.account, "--time": slurm.time,
                "--gpus-per-node": slurm.gpus_per_node, "--cpus-per-task": slurm.cpus_per_task}  # fmt: skip
    header += [f"#SBATCH {flag}={value}" for flag, value in optional.items() if value is not None]
    if hosts:
        header.append(f"#SBATCH --nodelist={','.join(h.name for h in hosts)}")
    header += [f"#SBATCH {line}" for line in slurm.extra_sbatch]
    launcher = _torchrun(
        config.python,
        ["--nnodes=$SLURM_NNODES", "--node-rank=$SLURM_NODEID", f"--nproc-per-node={nproc}",
         "--rdzv-backend=c10d", "--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT", "--rdzv-id=$SLURM_JOB_ID"],
        config,
        log_dir,
    )  # fmt: skip
    if config.master_addr is not None:
        master = f"export MASTER_ADDR={shlex.quote(config.master_addr)}"
    else:  # the first node of the allocation, known only once the job runs
        master = 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
    body = [
        "set -euo pipefail",
        f"cd {shlex.quote(workdir)}",
        master,
        f"export MASTER_PORT={config.master_port}",
        *exports,
        # Single quotes: each srun task expands $SLURM_NODEID itself, on its own node.
        f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(launcher)}",
    ]
    script = "\n".join([*header, "", *body]) + "\n"
    script_path = (log_dir or Path(".")) / f"{slurm.job_name}.sbatch"
    return LaunchPlan(argv=["sbatch", str(script_path)], sbatch_script=script)
