"""Column- and row-parallel linear layers (Megatron-style tensor parallelism).

A two-layer MLP is split so that only one all-reduce per direction is needed::

    X ──copy_to_tp──> X A_i^T  (ColumnParallelLinear: A split by output features, rank i holds A_i)
                          │ elementwise ops run on the local columns
                          v
                      Z_i B_i^T ──reduce_from_tp──> Y   (RowParallelLinear: B split by input features)

With sequence parallelism the copy becomes an all-gather of sequence shards and the all-reduce a
reduce-scatter back to sequence shards, so norms and dropout between blocks run on ``seq / tp`` tokens.

Weights are initialised full-size from ``seed`` and sliced (:func:`local_slice_of_init`): any tp size holds
exactly the slices of the tp=1 weights.
"""

from __future__ import annotations

import torch
from torch import nn

from scaling.core.nn.comm import (
    all_gather_from_sp,
    copy_to_tp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_tp,
)
from scaling.core.nn.param_meta import (
    InitMethod,
    ParamMeta,
    init_normal,
    init_zeros,
    local_slice_of_init,
    set_param_meta,
)
from scaling.core.topology.topology import Topology

__all__ = ["ColumnParallelLinear", "RowParallelLinear"]


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts != 0:
        raise ValueError(f"{what} ({total}) must be divisible by the tensor-parallel size ({parts})")
    return total // parts


class ColumnParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A`` ([out, in]) split along out: rank i computes ``out / tp`` columns of Y.

    Args:
        gather_output: all-gather the columns so every rank gets the full ``Y`` (otherwise ``Y`` stays split
            along its last dim, ready for a :class:`RowParallelLinear`).
        seed: seeds the full-size initialisation (weight from ``seed``, bias from ``seed + 1``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        topology: Topology,
        *,
        bias: bool = True,
        gather_output: bool = False,
        init_method: InitMethod | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.topology = topology
        self.in_features, self.out_features = in_features, out_features
        tp, rank = topology.tp_size, topology.tp_rank
        self.out_features_local = _divide(out_features, tp, "ColumnParallelLinear out_features")
        self.gather_output = gather_output
        self.sequence_parallel = topology.config.sequence_parallel and tp > 1
        if self.sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: gather_output is not supported with sequence parallelism")
        init = init_method or init_normal()
        weight = local_slice_of_init((out_features, in_features), init, seed, 0, rank, tp, dtype, topology.device)
        self.weight = nn.Parameter(weight)
        set_param_meta(self.weight, ParamMeta(tp_split_dim=0))
        self.bias: nn.Parameter | None = None
        if bias:
            b = local_slice_of_init((out_features,), init_zeros, seed + 1, 0, rank, tp, dtype, topology.device)
            self.bias = nn.Parameter(b)
            set_param_meta(self.bias, ParamMeta(tp_split_dim=0))

    # forward = leave(project(enter(x))): the three steps are separate so adapters (LoRA) can add to the
    # local projection while reusing the communication unchanged.
    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Into the tensor-parallel region: copy (or all-gather sequence shards) of the full input."""
        group = self.topology.tp_group
        return all_gather_from_sp(x, group) if self.sequence_parallel else copy_to_tp(x, group)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)  # [..., out_local]

    def leave(self, y: torch.Tensor) -> torch.Tensor:
        return gather_from_tp(y, self.topology.tp_group) if self.gather_output else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.leave(self.project(self.enter(x)))

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features} (local {self.out_features_local}), "
            f"tp_rank={self.topology.tp_rank}/{self.topology.tp_size}, bias={self.bias is not None}, "
            f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}"
        )


class RowParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A`` ([out, in]) split along in: rank i multiplies its ``in / tp`` slice of X,
    and the partial products are summed over tp ranks. The bias is replicated and added once, after the sum.

    Args:
        input_is_parallel: X already arrives split along its last dim (from a column-parallel layer);
            otherwise this rank's slice is taken here.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        topology: Topology,
        *,
        bias: bool = True,
        input_is_parallel: bool = True,
        init_method: InitMethod | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.topology = topology
        self.in_features, self.out_features = in_features, out_features
        tp, rank = topology.tp_size, topology.tp_rank
        self.in_features_local = _divide(in_features, tp, "RowParallelLinear in_features")
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = topology.config.sequence_parallel and tp > 1
        if self.sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence parallelism needs input_is_parallel=True")
        init = init_method or init_normal()
        weight = local_slice_of_init((out_features, in_features), init, seed, 1, rank, tp, dtype, topology.device)
        self.weight = nn.Parameter(weight)
        set_param_meta(self.weight, ParamMeta(tp_split_dim=1))
        self.bias: nn.Parameter | None = None
        if bias:
            b = local_slice_of_init((out_features,), init_zeros, seed + 1, None, rank, tp, dtype, topology.device)
            self.bias = nn.Parameter(b)
            # Under sequence parallelism the bias only sees this rank's tokens: its gradient is partial.
            set_param_meta(self.bias, ParamMeta(partial_grad_over_tp=self.sequence_parallel))

    # forward = leave(project(enter(x))), as in ColumnParallelLinear.
    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_is_parallel else scatter_to_tp(x, self.topology.tp_group)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)  # [..., out], a partial sum over tp ranks

    def leave(self, partial: torch.Tensor) -> torch.Tensor:
        group = self.topology.tp_group
        y = reduce_scatter_to_sp(partial, group) if self.sequence_parallel else reduce_from_tp(partial, group)
        return y + self.bias if self.bias is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.leave(self.project(self.enter(x)))

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features} (local {self.in_features_local}), out={self.out_features}, "
            f"tp_rank={self.topology.tp_rank}/{self.topology.tp_size}, bias={self.bias is not None}, "
            f"input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}"
        )
