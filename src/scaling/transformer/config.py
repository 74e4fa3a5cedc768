"""``TransformerConfig``: one YAML file describes a whole training run of the transformer suite."""

from __future__ import annotations

import importlib.util
import sys
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
from scaling.transformer.finetuning.targets import no_match_message, unmatched_targets
from scaling.transformer.model.config import (
    TransformerArchitectureConfig,
    check_against_tensor_parallel,
    projection_names,
)

__all__ = ["DataConfig", "TransformerConfig"]


class DataConfig(BaseConfig):
    """Where training data comes from."""

    prefixes: list[Path] = Field(
        default_factory=list,
        description="Memory-mapped token files (from `scaling prepare-data`) to pretrain on.",
        examples=[["data/my_corpus"]],  # the template's placeholder: `scaling config template`, then edit this
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
        _check_pipeline_stages(self.topology, self.architecture)
        _check_logging_packages(self.logger)
        if self.runner.rank_logs and self.logger.log_dir is None:
            raise InvalidCombination(
                "rank_logs writes per-rank logs under logger.log_dir, which is not set", "runner.rank_logs"
            )
        if self.finetuning is not None and self.finetuning.lora is not None:
            names = projection_names(self.architecture)
            for pattern in unmatched_targets(self.finetuning.lora.targets, names)[:1]:
                raise InvalidCombination(no_match_message(pattern, names), "finetuning.lora.targets")
        return self


def _check_pipeline_stages(topology: TopologyConfig, architecture: TransformerArchitectureConfig) -> None:
    """Every pipeline stage holds at least one decoder layer (found here, not as a partition error per rank)."""
    pp, layers = topology.pipe_parallel_size, architecture.num_layers
    if pp > layers:
        raise InvalidCombination(
            f"pipe_parallel_size ({pp}) is larger than num_layers ({layers}): every pipeline stage needs at least "
            "one layer; lower pipe_parallel_size or add layers",
            "topology.pipe_parallel_size",
            "architecture.num_layers",
        )
    stages, pieces = pp * topology.virtual_pipe_stages, layers + 2  # the embedding and the head are pieces too
    if stages > pieces:
        raise InvalidCombination(
            f"pipe_parallel_size ({pp}) x virtual_pipe_stages ({topology.virtual_pipe_stages}) = {stages} stages, "
            f"but the model has only {pieces} pieces to place (num_layers ({layers}) + embedding + head)",
            "topology.virtual_pipe_stages",
            "architecture.num_layers",
        )


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a module object without a spec (e.g. a stand-in in sys.modules)
        return sys.modules.get(package) is not None


def _check_logging_packages(logger: LoggerConfig) -> None:
    """Optional sinks need their package: checked when the config loads, before any process is launched."""
    for option in ("wandb", "tensorboard"):
        if getattr(logger, option) and not _installed(option):
            raise InvalidCombination(
                f"{option} is true but the '{option}' package is not installed; install it with: "
                f"pip install 'scaling[logging]' (or set {option}: false)",
                f"logger.{option}",
            )
