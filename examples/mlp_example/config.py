"""The example's config: engine sections from scaling.core plus the model's own few fields."""

from __future__ import annotations

from pydantic import Field

from scaling.core.config import BaseConfig
from scaling.core.logging import LoggerConfig
from scaling.core.nn.precision import PrecisionConfig
from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.runner import RunnerConfig
from scaling.core.topology import TopologyConfig
from scaling.core.trainer import TrainerConfig


class MLPModelConfig(BaseConfig):
    """A residual MLP classifier for 8x8 digit images."""

    hidden_size: int = Field(64, ge=1, description="Width of the residual stream.")
    ffn_size: int = Field(256, ge=1, description="Width inside each block (split over tensor-parallel ranks).")
    blocks: int = Field(3, ge=1, description="Residual MLP blocks between the input projection and the head.")
    padded_classes: int = Field(16, ge=10, description="Output logits (10 digits, padded to divide over tp ranks).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout after each block.")


class MLPConfig(BaseConfig):
    """Everything the MLP example needs, loaded from one YAML file."""

    topology: TopologyConfig = Field(default_factory=TopologyConfig, description="Parallel layout and batch sizes.")
    runner: RunnerConfig = Field(default_factory=RunnerConfig, description="How processes are started.")
    logger: LoggerConfig = Field(default_factory=LoggerConfig, description="Logs and metrics.")
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig, description="Training precision.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="AdamW and its schedule.")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="Loop length, eval and checkpoints.")
    model: MLPModelConfig = Field(default_factory=MLPModelConfig, description="Model shape.")
