"""``RunnerConfig``: where the processes of a run start and how they find each other."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from scaling.core.config import BaseConfig, InvalidCombination

__all__ = ["DEFAULT_MASTER_PORT", "DockerConfig", "RunnerConfig", "RunnerType", "SlurmConfig"]

DEFAULT_MASTER_PORT = 29500  # torch.distributed's customary port
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class RunnerType(str, Enum):
    """How the per-node launchers (``torch.distributed.run``) get started."""

    LOCAL = "local"  # all processes on this machine, started by torch.distributed.run
    PDSH = "pdsh"  # one torch.distributed.run per host, started over ssh by pdsh
    PDSH_DOCKER = "pdsh_docker"  # the same, inside a docker container on each host
    SLURM = "slurm"  # an sbatch script whose srun starts one torch.distributed.run per node


class DockerConfig(BaseConfig):
    """The container each node runs the training in (runner_type 'pdsh_docker')."""

    image: str | None = Field(None, description="Docker image to run; required for runner_type 'pdsh_docker'.")
    mounts: list[str] = Field(
        default_factory=list, description="Bind mounts as 'HOST_PATH:CONTAINER_PATH' (absolute paths)."
    )
    sudo: bool = Field(False, description="Prefix docker commands with sudo.")
    gpus: bool = Field(True, description="Pass all GPUs of the host into the container (--gpus=all).")
    extra_args: list[str] = Field(default_factory=list, description="Further arguments for 'docker run'.")

    @field_validator("mounts")
    @classmethod
    def _mounts_are_pairs(cls, mounts: list[str]) -> list[str]:
        for mount in mounts:
            parts = mount.split(":")
            if len(parts) not in (2, 3) or not all(p.startswith("/") for p in parts[:2]):
                raise ValueError(f"mount {mount!r} must be 'HOST_PATH:CONTAINER_PATH' with absolute paths")
        return mounts


class SlurmConfig(BaseConfig):
    """The sbatch header of a Slurm job (runner_type 'slurm')."""

    job_name: str = Field("scaling", description="Slurm job name.")
    partition: str | None = Field(None, description="Slurm partition (--partition); cluster default when unset.")
    account: str | None = Field(None, description="Slurm account (--account).")
    time: str | None = Field(None, description="Time limit, e.g. '2-00:00:00' (--time).")
    gpus_per_node: int | None = Field(None, ge=0, description="GPUs per node (--gpus-per-node).")
    cpus_per_task: int | None = Field(None, ge=1, description="CPUs for each node's launcher task (--cpus-per-task).")
    extra_sbatch: list[str] = Field(
        default_factory=list, description="Further #SBATCH options, e.g. '--exclusive' or '--mem=0'."
    )
    output: str = Field("slurm-%j.out", description="Log file of the job (--output); %j is the job id.")


class RunnerConfig(BaseConfig):
    """How to start the processes of a run: locally or on several hosts."""

    runner_type: RunnerType = Field(RunnerType.LOCAL, description="'local', 'pdsh', 'pdsh_docker' or 'slurm'.")
    hosts: list[str] | None = Field(None, description="Hosts to run on, in node-rank order (pdsh runners).")
    hostsfile: Path | None = Field(
        None, description="MPI-style hostfile ('worker-0 slots=4' per line); an alternative to hosts."
    )
    master_addr: str | None = Field(
        None, description="Address of the rendezvous host; default the first host, or 127.0.0.1 when local."
    )
    master_port: int = Field(
        DEFAULT_MASTER_PORT,
        ge=1,
        le=65535,
        description="Rendezvous port on master_addr. A local run that leaves it at 29500 (and sets no master_addr) "
        "lets the launcher pick a free port instead, so several local runs can share the machine.",
    )
    nproc_per_node: int | None = Field(
        None, ge=1, description="Processes per node; default the hostfile slots, or world size / number of nodes."
    )
    script: str = Field(
        "scaling.core.runner.world_check",
        description="Python script path, or a module name when module is true. The default checks that every "
        "process group of the topology communicates.",
    )
    module: bool = Field(
        True, description="true: script is a module, run as 'python -m SCRIPT'; false: script is a file path."
    )
    script_args: list[str] = Field(default_factory=list, description="Arguments passed to the script.")
    max_restarts: int = Field(0, ge=0, description="Restarts of the whole local world after a failure (torchrun).")
    rank_logs: bool = Field(
        False,
        description="Also write every rank's stdout and stderr to files under <logger.log_dir>/ranks/ (torchrun "
        "--log-dir; the console keeps them, each line prefixed with its rank, and the workers then see no terminal, "
        "so no progress bar). Needs logger.log_dir, the one log directory of a run; relative paths are relative "
        "to workdir on remote nodes.",
    )
    env_forward: list[str] = Field(
        default_factory=list,
        description="Names of environment variables whose values here are passed on to the remote processes "
        "(pdsh, pdsh_docker, slurm).",
    )
    python: str = Field("python", description="Python interpreter on remote nodes.")
    workdir: str | None = Field(None, description="Working directory on remote nodes; default this directory.")
    docker: DockerConfig = Field(default_factory=DockerConfig, description="Container settings for pdsh_docker.")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="Job settings for slurm.")

    @field_validator("hosts")
    @classmethod
    def _hosts_are_plain_names(cls, hosts: list[str] | None) -> list[str] | None:
        # pdsh reads ',' as a separator and '[0-3]' as a range: either would start other nodes than listed here.
        for host in hosts or []:
            if not host or any(c.isspace() or c in ",[]" for c in host):
                raise ValueError(f"host {host!r} must be a single host name (no spaces, commas or [ranges])")
        return hosts

    @field_validator("env_forward")
    @classmethod
    def _env_names_are_identifiers(cls, names: list[str]) -> list[str]:
        # The names end up unquoted in 'export NAME=...' on the remote shell.
        for name in names:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not an environment variable name (letters, digits, '_')")
        return names

    @model_validator(mode="before")
    @classmethod
    def _log_dir_moved(cls, data: object) -> object:
        # runner.log_dir and logger.log_dir were two keys for one directory: an old config says which to use.
        if isinstance(data, dict) and "log_dir" in data:
            raise InvalidCombination(
                "runner.log_dir is gone: a run has one log directory, logger.log_dir; set that instead (and "
                "runner.rank_logs: true for per-rank log files under <logger.log_dir>/ranks/)",
                "log_dir",
            )
        return data

    @model_validator(mode="after")
    def _check(self) -> RunnerConfig:
        if self.hosts is not None and self.hostsfile is not None:
            raise InvalidCombination("give hosts or hostsfile, not both", "hostsfile")
        if self.hosts is not None and len(set(self.hosts)) != len(self.hosts):
            raise InvalidCombination(f"hosts contains duplicates: {self.hosts}", "hosts")
        if self.runner_type == RunnerType.PDSH_DOCKER and not self.docker.image:
            raise InvalidCombination("runner_type 'pdsh_docker' needs docker.image", "docker.image")
        return self
