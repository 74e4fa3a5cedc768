"""Training precision: the dtype of parameters and activations, and how gradients are reduced.

bf16 and fp16 are configuration, not code paths: the engine casts the model, the optimizer keeps fp32
master weights whenever parameters are narrower than fp32, and fp16 adds dynamic loss scaling.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch
from pydantic import Field
from torch.utils import _pytree as pytree

from scaling.core.config import BaseConfig

__all__ = ["Precision", "PrecisionConfig", "cast_floating"]


class Precision(str, Enum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    @property
    def dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.value]


class PrecisionConfig(BaseConfig):
    """Parameter/activation dtype and gradient reduction dtype."""

    precision: Precision = Field(
        Precision.FLOAT32,
        description="dtype of parameters and activations: 'float32', 'bfloat16' or 'float16' (with loss "
        "scaling). The optimizer keeps fp32 master weights and states for the narrower ones.",
    )
    reduce_grads_in_fp32: bool = Field(
        True,
        description="Average gradients over data-parallel ranks in fp32 even when parameters are bf16/fp16 "
        "(more accurate, twice the bytes).",
    )


def cast_floating(value: Any, dtype: torch.dtype) -> Any:
    """Cast the floating-point tensors of a pytree (a model input) to ``dtype``; others pass unchanged."""

    def cast(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.dtype != dtype:
            return leaf.to(dtype)
        return leaf

    return pytree.tree_map(cast, value)
