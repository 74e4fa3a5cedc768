"""``TopologyConfig``: how many ranks of each kind, how big the batches are, and how layers are placed.

Sizes may be left out and are inferred (``data_parallel_size`` from ``world_size``, or ``world_size`` from
the product); of the batch trio (global, micro, gradient accumulation) any two determine the third.
After validation every size and batch field holds an int.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import Field, model_validator

from scaling.core.config import BaseConfig, InvalidCombination

__all__ = ["ActivationCheckpointingType", "PipePartitionMethod", "TopologyConfig"]


class ActivationCheckpointingType(str, Enum):
    """Which activations are recomputed in the backward pass instead of being kept."""

    DISABLED = "disabled"
    EVERY_LAYER = "every_layer"
    EVERY_PIPE_STAGE = "every_pipe_stage"


class PipePartitionMethod(str, Enum):
    """How layers are split over pipeline stages when no explicit list is given."""

    UNIFORM = "uniform"  # the same number of layers per stage
    BALANCED = "balanced"  # about the same number of parameters per stage


class TopologyConfig(BaseConfig):
    """The data x pipeline x tensor parallel layout and the batch sizes of one training run."""

    model_parallel_size: int = Field(1, ge=1, description="Tensor-parallel size: ranks that split each layer.")
    pipe_parallel_size: int = Field(1, ge=1, description="Pipeline-parallel size: stages the layers are split over.")
    data_parallel_size: int | None = Field(
        None, ge=1, description="Data-parallel size: model replicas. Inferred from world_size when left out."
    )
    world_size: int | None = Field(
        None,
        ge=1,
        description="Total number of ranks; must equal tp x pp x dp. Inferred from the sizes when left out.",
    )
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="Samples per optimizer step over all data-parallel ranks "
        "(= micro_batch_size x gradient_accumulation_steps x data_parallel_size).",
    )
    micro_batch_size: int | None = Field(
        None, ge=1, description="Samples per forward/backward pass on one data-parallel rank."
    )
    gradient_accumulation_steps: int | None = Field(
        None, ge=1, description="Micro-batches per optimizer step (also the number of micro-batches in the pipeline)."
    )
    pipe_partition_method: PipePartitionMethod | list[int] = Field(
        PipePartitionMethod.UNIFORM,
        description="'uniform' (equal layer counts), 'balanced' (equal parameter counts), "
        "or an explicit list with the number of layers on each stage.",
    )
    activation_checkpointing_type: ActivationCheckpointingType = Field(
        ActivationCheckpointingType.DISABLED,
        description="'disabled', 'every_layer' (recompute each layer) or 'every_pipe_stage' "
        "(recompute the stage's layers as one block).",
    )
    sequence_parallel: bool = Field(
        False,
        description="Split norms and dropout along the sequence over tensor-parallel ranks "
        "(all-gather / reduce-scatter replace the all-reduce).",
    )
    pipe_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = Field(
        "1f1b",
        description="Pipeline schedule: 'gpipe' (all forwards then all backwards), '1f1b' (bounded activation "
        "memory), 'interleaved_1f1b' (several model chunks per rank, smaller bubble).",
    )
    virtual_pipe_stages: int = Field(
        1, ge=1, description="Model chunks per pipeline rank; more than 1 needs pipe_schedule 'interleaved_1f1b'."
    )
    grad_reduce_bucket_mb: float = Field(
        25.0,
        gt=0,
        description="Size in MiB of the buckets in which gradients are all-reduced over data-parallel ranks; "
        "a bucket starts reducing as soon as its gradients are ready, overlapping the rest of the backward pass.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' uses CUDA (NCCL) when available, else CPU (gloo). 'cuda' fails without a GPU."
    )
    collective_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Seconds a collective (all-reduce, send/recv, ...) may wait for its peers before the rank "
        "fails with an error: a rank that stopped or hangs ends the whole run after this long.",
    )

    @model_validator(mode="before")
    @classmethod
    def _infer_sizes(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if not all(_is_int_or_none(data.get(k)) for k in _SIZE_AND_BATCH_FIELDS):
            return data  # let field validation report the wrong type
        tp = data.get("model_parallel_size", 1) or 1
        pp = data.get("pipe_parallel_size", 1) or 1
        dp, world = data.get("data_parallel_size"), data.get("world_size")
        if dp is None:
            if world is None:
                dp = 1
            elif world % (tp * pp) != 0:
                raise InvalidCombination(
                    f"world_size ({world}) is not divisible by model_parallel_size ({tp}) x pipe_parallel_size ({pp})",
                    "world_size",
                )
            else:
                dp = world // (tp * pp)
            data["data_parallel_size"] = dp
        if world is None:
            data["world_size"] = tp * pp * dp

        glob, micro, gas = (data.get(k) for k in _BATCH_FIELDS)
        if gas is None and (glob is None or micro is None):
            gas = 1  # with at most one of the trio given, accumulate nothing
        if micro is None:
            micro = 1 if glob is None else _exact_div(glob, gas * dp, "micro_batch_size")
        if glob is None:
            glob = micro * gas * dp
        if gas is None:
            gas = _exact_div(glob, micro * dp, "gradient_accumulation_steps")
        data.update(global_batch_size=glob, micro_batch_size=micro, gradient_accumulation_steps=gas)
        return data

    @model_validator(mode="after")
    def _check_consistency(self) -> TopologyConfig:
        tp, pp, dp = self.model_parallel_size, self.pipe_parallel_size, self.data_parallel_size
        if self.world_size != tp * pp * dp:  # type: ignore[operator]
            raise InvalidCombination(
                f"world_size ({self.world_size}) != model_parallel_size ({tp}) x pipe_parallel_size ({pp}) "
                f"x data_parallel_size ({dp}) = {tp * pp * dp}",  # type: ignore[operator]
                "world_size",
            )
        glob, micro, gas = self.global_batch_size, self.micro_batch_size, self.gradient_accumulation_steps
        if glob != micro * gas * dp:  # type: ignore[operator]
            raise InvalidCombination(
                f"global_batch_size ({glob}) != micro_batch_size ({micro}) x gradient_accumulation_steps ({gas}) "
                f"x data_parallel_size ({dp}) = {micro * gas * dp}",  # type: ignore[operator]
                "global_batch_size",
            )
        method = self.pipe_partition_method
        if isinstance(method, list):
            if len(method) != pp:
                raise InvalidCombination(
                    f"an explicit partition needs one layer count per stage: got {len(method)} entries "
                    f"for pipe_parallel_size ({pp})",
                    "pipe_partition_method",
                )
            if any(count < 1 for count in method):
                raise InvalidCombination(
                    f"every pipeline stage needs at least one layer, got {method}", "pipe_partition_method"
                )
        if self.virtual_pipe_stages > 1 and self.pipe_schedule != "interleaved_1f1b":
            raise InvalidCombination(
                f"virtual_pipe_stages ({self.virtual_pipe_stages}) > 1 needs pipe_schedule 'interleaved_1f1b', "
                f"got {self.pipe_schedule!r}",
                "virtual_pipe_stages",
            )
        if self.pipe_schedule == "interleaved_1f1b" and gas % pp != 0:  # type: ignore[operator]
            raise InvalidCombination(
                f"the interleaved schedule needs gradient_accumulation_steps ({gas}) to be a multiple of "
                f"pipe_parallel_size ({pp})",
                "gradient_accumulation_steps",
            )
        return self

    # Typed views: after validation the inferred fields are always set.
    @property
    def tp(self) -> int:
        return self.model_parallel_size

    @property
    def pp(self) -> int:
        return self.pipe_parallel_size

    @property
    def dp(self) -> int:
        assert self.data_parallel_size is not None
        return self.data_parallel_size

    @property
    def n_ranks(self) -> int:
        assert self.world_size is not None
        return self.world_size

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step (the gradient accumulation steps)."""
        assert self.gradient_accumulation_steps is not None
        return self.gradient_accumulation_steps

    @property
    def micro_batch(self) -> int:
        assert self.micro_batch_size is not None
        return self.micro_batch_size

    @property
    def global_batch(self) -> int:
        assert self.global_batch_size is not None
        return self.global_batch_size


_BATCH_FIELDS = ("global_batch_size", "micro_batch_size", "gradient_accumulation_steps")
_SIZE_AND_BATCH_FIELDS = (
    "model_parallel_size",
    "pipe_parallel_size",
    "data_parallel_size",
    "world_size",
    *_BATCH_FIELDS,
)


def _is_int_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


def _exact_div(numerator: int, denominator: int, field: str) -> int:
    if numerator % denominator != 0:
        raise InvalidCombination(
            f"cannot infer {field}: {numerator} is not divisible by {denominator} "
            "(global_batch_size must equal micro_batch_size x gradient_accumulation_steps x data_parallel_size)",
            field,
        )
    return numerator // denominator
