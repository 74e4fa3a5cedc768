"""The model-agnostic engine: config, topology, parallel layers, pipeline, optimizer, data, trainer.

The public API is importable from here (``from scaling.core import Topology, Trainer``). Names resolve on
first use (PEP 562), so ``import scaling.core.config`` does not pull in torch.distributed, the pipeline
and the trainer, and the submodules can import each other without cycles through this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scaling._lazy import lazy_exports

if TYPE_CHECKING:
    from scaling.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from scaling.core.config import BaseConfig, ConfigError
    from scaling.core.data import DataFileError, DistributedDataLoader, MemoryMapDataset
    from scaling.core.nn import (
        ColumnParallelLinear,
        LayerNorm,
        ParamMeta,
        RMSNorm,
        RowParallelLinear,
        VocabParallelEmbedding,
    )
    from scaling.core.nn.param_table import ParamTable
    from scaling.core.optimizer.config import OptimizerConfig
    from scaling.core.optimizer.optimizer import Optimizer
    from scaling.core.pipeline.layer_spec import LayerSpec, TiedLayerSpec
    from scaling.core.pipeline.module import ParallelModule
    from scaling.core.topology import Topology, TopologyConfig
    from scaling.core.trainer import Trainer, TrainerConfig, TrainingContext, TrainingDiverged
    from scaling.core.zero import ShardingPolicy

# public name -> the module that defines it
_HOME = {
    "BaseConfig": "scaling.core.config",
    "ConfigError": "scaling.core.config",
    "Topology": "scaling.core.topology",
    "TopologyConfig": "scaling.core.topology",
    "ColumnParallelLinear": "scaling.core.nn",
    "RowParallelLinear": "scaling.core.nn",
    "VocabParallelEmbedding": "scaling.core.nn",
    "LayerNorm": "scaling.core.nn",
    "RMSNorm": "scaling.core.nn",
    "ParamMeta": "scaling.core.nn",
    "LayerSpec": "scaling.core.pipeline.layer_spec",
    "TiedLayerSpec": "scaling.core.pipeline.layer_spec",
    "ParallelModule": "scaling.core.pipeline.module",
    "Optimizer": "scaling.core.optimizer.optimizer",
    "OptimizerConfig": "scaling.core.optimizer.config",
    "ShardingPolicy": "scaling.core.zero",
    "ParamTable": "scaling.core.nn.param_table",
    "DataFileError": "scaling.core.data",
    "DistributedDataLoader": "scaling.core.data",
    "MemoryMapDataset": "scaling.core.data",
    "CheckpointError": "scaling.core.checkpoint",
    "load_checkpoint": "scaling.core.checkpoint",
    "save_checkpoint": "scaling.core.checkpoint",
    "Trainer": "scaling.core.trainer",
    "TrainerConfig": "scaling.core.trainer",
    "TrainingContext": "scaling.core.trainer",
    "TrainingDiverged": "scaling.core.trainer",
}

__all__ = [
    "BaseConfig",
    "CheckpointError",
    "ColumnParallelLinear",
    "ConfigError",
    "DataFileError",
    "DistributedDataLoader",
    "LayerNorm",
    "LayerSpec",
    "MemoryMapDataset",
    "Optimizer",
    "OptimizerConfig",
    "ParallelModule",
    "ParamMeta",
    "ParamTable",
    "RMSNorm",
    "RowParallelLinear",
    "ShardingPolicy",
    "TiedLayerSpec",
    "Topology",
    "TopologyConfig",
    "Trainer",
    "TrainerConfig",
    "TrainingContext",
    "TrainingDiverged",
    "VocabParallelEmbedding",
    "load_checkpoint",
    "save_checkpoint",
]
assert sorted(_HOME) == __all__  # one entry per public name

__getattr__, __dir__ = lazy_exports("scaling.core", globals(), _HOME)
