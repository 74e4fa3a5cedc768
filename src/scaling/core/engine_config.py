"""``EngineConfig``: the sections every scaling run has (layout, launching, logging).

Model- and training-specific configs (the trainer, the transformer suite) extend it with their own
sections; ``scaling config template`` prints it with every default.
"""

from __future__ import annotations

from pydantic import Field

from scaling.core.config import BaseConfig
from scaling.core.logging.config import LoggerConfig
from scaling.core.runner.config import RunnerConfig
from scaling.core.topology.config import TopologyConfig

__all__ = ["EngineConfig"]


class EngineConfig(BaseConfig):
    """A scaling run: parallel layout, how its processes start, and where its logs go."""

    topology: TopologyConfig = Field(default_factory=TopologyConfig, description="Parallel layout and batch sizes.")
    runner: RunnerConfig = Field(default_factory=RunnerConfig, description="How the processes are started.")
    logger: LoggerConfig = Field(default_factory=LoggerConfig, description="Text log and metrics sinks.")
