"""A project: the directory holding ``scaling.yml``, its experiment modules and its runs.

``scaling.yml`` says where the experiments are defined and where they run (hosts, the SSH user and port,
processes per node, environment variables to forward, venv or docker). Every project command (``scaling
run``, ``scaling experiments list``, ``scaling build-experiments``, ``scaling show-deploy-key``) first finds
the project root by walking up from the current directory, as git finds its repository, so they work from
any subdirectory. The file is typed and validated on load: a wrong value is one line naming the field.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import Field, field_validator

from scaling.core.config import BaseConfig, ConfigError

__all__ = ["PROJECT_FILE", "ProjectConfig", "ProjectError", "find_project", "load_project_config"]

PROJECT_FILE = "scaling.yml"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PROJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ProjectError(ValueError):
    """No project where one was expected, or a ``scaling.yml`` that does not validate (the message says which)."""


def _relative_posix(value: str, what: str) -> str:
    """``value`` if it is a relative path that stays inside the project (no ``..``), else an error."""
    path = PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{what} {value!r} must be a path relative to the project root, inside it")
    return value


class ProjectConfig(BaseConfig):
    """``scaling.yml``: where a project's experiments are defined and where they run."""

    name: str = Field(description="Project name (letters, digits, '.', '_', '-'): names images and workflows.")
    experiments: list[str] = Field(
        default_factory=lambda: ["src/experiments.py"],
        description="Python files that define experiments (@experiment), relative to the project root.",
    )
    hosts: list[str] = Field(
        default_factory=lambda: ["localhost"], description="Nodes that run the experiments, in node-rank order."
    )
    user: str | None = Field(None, description="SSH user on the hosts; default the local user.")
    port: int = Field(22, ge=1, le=65535, description="SSH port of the hosts.")
    processes_per_node: int = Field(1, ge=1, description="Processes (usually one per GPU) each host starts.")
    env: list[str] = Field(
        default_factory=list,
        description="Names of environment variables passed on to the runs (e.g. HF_TOKEN, WANDB_API_KEY).",
    )
    runs_dir: str = Field("runs", description="Where run records go, relative to the project root.")
    runtime: Literal["venv", "docker"] = Field(
        "venv", description="How nodes run the code: 'venv' (pinned requirements) or 'docker' (the Dockerfile)."
    )
    scheduler: Literal["local", "slurm"] = Field(
        "local",
        description="How runs start: 'local' (`scaling run`) or 'slurm' (the generated run workflows submit "
        "through `scaling queue submit`).",
    )
    ssh_identity: str | None = Field(
        None,
        description="Private key that logs into the hosts (absolute, or relative to the project root); "
        "default: what ssh uses by itself (agent, ~/.ssh/id_*).",
    )
    known_hosts: str = Field(
        ".scaling/known_hosts",
        description="Where the hosts' SSH keys are pinned, relative to the project root: recorded on first "
        "contact (fingerprints printed), a later mismatch is refused.",
    )
    rendezvous_port: int = Field(
        29500, ge=1, le=65535, description="TCP port of the torch.distributed rendezvous on the first host."
    )
    node_dir: str = Field(
        ".scaling/projects",
        description="Where `scaling nodes setup` puts the project and its venv on each host, relative to the "
        "SSH user's home (the variable SCALING_NODE_DIR in a host's login environment replaces it).",
    )
    node_python: str = Field("python3", description="The Python on the hosts that the project's venv is made from.")
    venv_system_site_packages: bool = Field(
        False, description="Make the hosts' venv with --system-site-packages (reuse packages the image has)."
    )
    slurm_conf_dir: str = Field(
        "/etc/slurm",
        description="Where `scaling nodes setup --slurm` writes slurm.conf and gres.conf on the hosts "
        "(/etc/slurm-llnl on Debian before 11).",
    )
    munge_key_file: str = Field(
        "/etc/munge/munge.key", description="The munge key file on the hosts (`scaling nodes setup --slurm`)."
    )
    min_free_disk_gb: float = Field(
        10.0, ge=0, description="`scaling nodes check` fails a host with less free disk (GB) under node_dir."
    )
    max_clock_skew_s: float = Field(
        2.0, gt=0, description="`scaling nodes check` fails a host whose clock is further off this machine's (s)."
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not _PROJECT_NAME.fullmatch(name):
            raise ValueError(f"{name!r} must start with a letter or digit and hold only letters, digits, '.', '_', '-'")
        return name

    @field_validator("experiments")
    @classmethod
    def _experiment_files(cls, files: list[str]) -> list[str]:
        if not files:
            raise ValueError("list at least one experiment file")
        return [_relative_posix(f, "experiment file") for f in files]

    @field_validator("hosts")
    @classmethod
    def _host_names(cls, hosts: list[str]) -> list[str]:
        if not hosts:
            raise ValueError("list at least one host")
        for host in hosts:
            if not host or any(c.isspace() or c in ",[]@" for c in host):
                raise ValueError(f"host {host!r} must be one host name (no spaces, commas, '@' or [ranges])")
        return hosts

    @field_validator("env")
    @classmethod
    def _env_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not an environment variable name")
        return names

    @field_validator("runs_dir")
    @classmethod
    def _runs_dir(cls, runs_dir: str) -> str:
        return _relative_posix(runs_dir, "runs_dir")

    @field_validator("known_hosts")
    @classmethod
    def _known_hosts(cls, path: str) -> str:
        return _relative_posix(path, "known_hosts")

    @field_validator("node_dir")
    @classmethod
    def _node_dir(cls, path: str) -> str:
        posix = PurePosixPath(path)
        if not path or posix.is_absolute() or ".." in posix.parts or any(c.isspace() for c in path):
            raise ValueError(f"node_dir {path!r} must be a path relative to the SSH user's home (no '..', no spaces)")
        return path

    @field_validator("slurm_conf_dir", "munge_key_file")
    @classmethod
    def _absolute(cls, path: str) -> str:
        if not (PurePosixPath(path).is_absolute() or path.startswith("~/")) or any(c.isspace() for c in path):
            raise ValueError(f"{path!r} must be an absolute path on the hosts, or start with ~/ (no spaces)")
        return path

    @field_validator("node_python")
    @classmethod
    def _node_python(cls, python: str) -> str:
        if not python or any(c.isspace() for c in python):
            raise ValueError(f"node_python {python!r} must be one command name or path (no spaces)")
        return python


def find_project(start: Path | str | None = None) -> Path:
    """The nearest directory at or above ``start`` (default: the current one) that holds ``scaling.yml``."""
    here = Path.cwd() if start is None else Path(start)
    here = here.resolve()
    if not here.exists():
        raise ProjectError(f"{here} does not exist")
    for directory in (here, *here.parents):
        if (directory / PROJECT_FILE).is_file():
            return directory
    raise ProjectError(f"no {PROJECT_FILE} in {here} or above it: run `scaling init PROJECT` to create a project")


def load_project_config(root: Path | str) -> ProjectConfig:
    """``root/scaling.yml`` validated; any problem is one ``ProjectError`` line naming the file and the field."""
    path = Path(root) / PROJECT_FILE
    try:
        return ProjectConfig.from_yaml(path)
    except ConfigError as exc:
        detail = "; ".join(exc.problems) if exc.problems else " ".join(str(exc).split())
        raise ProjectError(f"{path}: {detail}") from None
