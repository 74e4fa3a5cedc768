"""``TransformerConfig``: one YAML file describes a whole training run of the transformer suite."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from scaling.core.config import BaseConfig, InvalidCombination
from scaling.core.logging import LoggerConfig
from scaling.core.nn.precision import PrecisionConfig
from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.runner import RunnerConfig
from scaling.core.topology import TopologyConfig
from scaling.core.trainer import TrainerConfig
from scaling.transformer.finetuning.config import FinetuningConfig
from scaling.transformer.model.config import TransformerArchitectureConfig, check_against_tensor_parallel

__all__ = ["DataConfig", "TransformerConfig"]


class DataConfig(BaseConfig):
    """Where training data comes from."""

    prefixes: list[Path] = Field(
        default_factory=list, description="Memory-mapped token files (from `scaling prepare-data`) to pretrain on."
    )
    weights: list[float] | None = Field(None, description="Blend weights of the prefixes; by size when unset.")
    finetuning_jsonl: Path | None = Field(
        None, description="Prompt/completion or chat JSONL to finetune on (instead of prefixes)."
    )
    tokenizer: Path | None = Field(None, description="tokenizer.json; needed for finetuning JSONL and generation.")
    validation_fraction: float = Field(0.02, ge=0, lt=1, description="Share of the data held out for evaluation.")
    blend_cache_dir: Path | None = Field(None, description="Where blended indices are cached.")
    num_workers: int = Field(0, ge=0, description="Data-loading worker processes per reading rank.")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if not self.prefixes and self.finetuning_jsonl is None:
            raise InvalidCombination("give prefixes (pretraining) or finetuning_jsonl", "prefixes")
        if self.weights is not None and len(self.weights) != len(self.prefixes):
            raise InvalidCombination(f"{len(self.weights)} weights for {len(self.prefixes)} prefixes", "weights")
        if self.finetuning_jsonl is not None and self.tokenizer is None:
            raise InvalidCombination("finetuning_jsonl needs a tokenizer", "tokenizer")
        return self


class TransformerConfig(BaseConfig):
    """A transformer training run: layout, launch, logs, precision, optimizer, loop, model, data."""

    topology: TopologyConfig = Field(default_factory=TopologyConfig, description="Parallel layout and batch sizes.")
    runner: RunnerConfig = Field(default_factory=RunnerConfig, description="How processes are started.")
    logger: LoggerConfig = Field(default_factory=LoggerConfig, description="Logs and metrics.")
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig, description="Training precision.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="AdamW, groups and schedules.")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="Loop length, eval and checkpoints.")
    architecture: TransformerArchitectureConfig = Field(
        default_factory=TransformerArchitectureConfig, description="Model shape."
    )
    data: DataConfig = Field(description="Training data (required).")
    finetuning: FinetuningConfig | None = Field(None, description="LoRA/BitFit/adapters; full training when unset.")

    @model_validator(mode="after")
    def _fits_the_layout(self) -> TransformerConfig:
        try:
            check_against_tensor_parallel(self.architecture, self.topology.tp)
        except InvalidCombination as exc:
            raise InvalidCombination(str(exc), *(f"architecture.{f}" for f in exc.fields)) from None
        return self
