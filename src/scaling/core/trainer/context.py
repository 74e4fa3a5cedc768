"""The context handed to user code: the run's config, the topology, and where training stands."""

from __future__ import annotations

from dataclasses import dataclass

from scaling.core.config import BaseConfig
from scaling.core.topology.topology import Topology

__all__ = ["TrainingContext"]


@dataclass
class TrainingContext:
    config: BaseConfig
    topology: Topology
    step: int = 0  # optimizer steps completed
    consumed_samples: int = 0  # training samples seen over all data-parallel ranks
