"""Launching: local (torchrun), pdsh/ssh, pdsh + docker, Slurm."""

from scaling.core.runner.commands import LaunchPlan, NodeCommand, plan_launch
from scaling.core.runner.config import DockerConfig, RunnerConfig, RunnerType, SlurmConfig
from scaling.core.runner.hostfile import Host, parse_hostfile, read_hostfile
from scaling.core.runner.launch import launch

__all__ = [
    "DockerConfig",
    "Host",
    "LaunchPlan",
    "NodeCommand",
    "RunnerConfig",
    "RunnerType",
    "SlurmConfig",
    "launch",
    "parse_hostfile",
    "plan_launch",
    "read_hostfile",
]
