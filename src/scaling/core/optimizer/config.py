"""Optimizer configuration: AdamW hyper-parameters, parameter groups, clipping, ZeRO, loss scaling."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from scaling.core.config import BaseConfig, InvalidCombination
from scaling.core.logging import get_logger
from scaling.core.optimizer.loss_scaler import LossScalerConfig
from scaling.core.optimizer.lr_schedule import LearningRateScheduleConfig
from scaling.core.zero.policy import Offload, ReshardAfterForward, ShardingPolicy

__all__ = ["OptimizerConfig", "TrainingGroupConfig"]

_logger = get_logger("scaling.config")


class TrainingGroupConfig(BaseConfig):
    """A set of parameters (by name pattern) sharing weight decay and learning-rate schedule."""

    name: str = Field("default", description="Name of the group, used in logs (lr/<name>) and checkpoints.")
    parameters: list[str] = Field(
        default_factory=lambda: ["*"],
        description="fnmatch patterns on parameter names ('layers.3.*', '*.bias'); a parameter joins the "
        "first group with a matching pattern.",
    )
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay of the group's parameters.")
    no_weight_decay: list[str] = Field(
        default_factory=lambda: ["*bias", "*norm*"],
        description="Patterns of parameters in this group that get no weight decay (biases and norms by default).",
    )
    learning_rate_schedule: LearningRateScheduleConfig = Field(
        default_factory=LearningRateScheduleConfig, description="Warm-up and decay of the group's learning rate."
    )


class OptimizerConfig(BaseConfig):
    """AdamW with fp32 master weights, ZeRO stages 0-3 and dynamic loss scaling."""

    beta1: float = Field(0.9, gt=0, lt=1, description="Adam beta1 (first-moment decay).")
    beta2: float = Field(0.95, gt=0, lt=1, description="Adam beta2 (second-moment decay).")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    gradient_clipping: float = Field(
        1.0, ge=0, description="Clip the global gradient L2 norm to this value; 0 disables clipping."
    )
    zero: bool = Field(False, description="Deprecated: read as zero_stage 1.")
    zero_stage: Literal[0, 1, 2, 3] = Field(
        0,
        description="ZeRO stage over data-parallel ranks (FSDP2 for 1-3): 0 none; 1 shards fp32 masters and "
        "Adam states, gradients reduce-scattered once per step; 2 also reduce-scatters every micro-batch; 3 "
        "also frees each layer's gathered parameters after its forward.",
    )
    offload: Offload = Field(
        Offload.NONE,
        description="'cpu': keep sharded parameters, gradients and optimizer state in CPU memory (ZeRO 1-3).",
    )
    reshard_after_forward: ReshardAfterForward = Field(
        ReshardAfterForward.AUTO,
        description="Free gathered parameters after each layer's forward: 'auto' (stage 3 only), 'always', 'never'.",
    )
    training_groups: list[TrainingGroupConfig] = Field(
        default_factory=lambda: [TrainingGroupConfig()],
        description="Parameter groups; every trainable parameter must match one, every pattern some parameter.",
    )
    loss_scaler: LossScalerConfig = Field(
        default_factory=LossScalerConfig, description="Dynamic loss scaling, used with float16 parameters only."
    )

    @model_validator(mode="after")
    def _zero_stage(self) -> OptimizerConfig:
        if self.zero:
            if "zero_stage" in self.model_fields_set and self.zero_stage != 1:
                raise InvalidCombination(
                    f"zero: true (deprecated, meaning stage 1) contradicts zero_stage: {self.zero_stage}; "
                    "remove 'zero'",
                    "zero",
                )
            _logger.warning("optimizer.zero is deprecated; read as optimizer.zero_stage: 1")
            object.__setattr__(self, "zero_stage", 1)
            object.__setattr__(self, "zero", False)
        if self.zero_stage == 0 and self.offload != Offload.NONE:
            raise InvalidCombination("offload needs zero_stage 1, 2 or 3", "offload")
        return self

    @property
    def sharding(self) -> ShardingPolicy:
        """What the model must be built with for this optimizer (``ParallelModule(sharding=...)``)."""
        return ShardingPolicy(self.zero_stage, self.offload, self.reshard_after_forward)

    @model_validator(mode="after")
    def _unique_group_names(self) -> OptimizerConfig:
        names = [g.name for g in self.training_groups]
        if len(set(names)) != len(names):
            raise InvalidCombination(f"group names must be unique, got {names}", "training_groups")
        if not self.training_groups:
            raise InvalidCombination("at least one training group is needed", "training_groups")
        return self
