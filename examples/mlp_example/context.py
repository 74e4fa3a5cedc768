"""``MLPContext``: the training context typed for this example, plus which rank reports results.

The trainer hands a context (config, topology, step counters) to user code. Subclassing it keeps the
example's own config type visible to the type checker and gives the code one place to ask "am I the
rank that holds the metrics?" (last pipeline stage, first data-parallel replica, first tp rank).
"""

from __future__ import annotations

from dataclasses import dataclass

from examples.mlp_example.config import MLPConfig
from scaling.core.trainer import TrainingContext


@dataclass
class MLPContext(TrainingContext):
    config: MLPConfig

    @property
    def is_reporting_rank(self) -> bool:
        topology = self.topology
        return topology.is_last_pipe_stage and topology.dp_rank == 0 and topology.tp_rank == 0
