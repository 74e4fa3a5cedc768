"""Tensor-parallel building blocks: communication pairs, parallel layers, parameter metadata, dropout."""

from scaling.core.nn.comm import (
    all_gather_from_sp,
    copy_to_tp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_sp,
    scatter_to_tp,
)
from scaling.core.nn.cross_entropy import vocab_parallel_cross_entropy
from scaling.core.nn.dropout import LayoutInvariantDropout
from scaling.core.nn.embedding import VocabParallelEmbedding
from scaling.core.nn.linear import ColumnParallelLinear, RowParallelLinear
from scaling.core.nn.norm import LayerNorm, RMSNorm
from scaling.core.nn.param_meta import ParamMeta, get_param_meta, set_param_meta, shard, unshard

__all__ = [
    "ColumnParallelLinear",
    "LayerNorm",
    "LayoutInvariantDropout",
    "ParamMeta",
    "RMSNorm",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "all_gather_from_sp",
    "copy_to_tp",
    "gather_from_tp",
    "get_param_meta",
    "reduce_from_tp",
    "reduce_scatter_to_sp",
    "scatter_to_sp",
    "scatter_to_tp",
    "set_param_meta",
    "shard",
    "unshard",
    "vocab_parallel_cross_entropy",
]
