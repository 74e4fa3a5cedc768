"""Tensor- and sequence-parallel communication as conjugate autograd pairs.

Each function is the forward of one collective whose backward is its conjugate, so gradients are right
by construction:

====================  ==============================  ==============================
function              forward                         backward
====================  ==============================  ==============================
copy_to_tp            identity                        all-reduce
reduce_from_tp        all-reduce                      identity
scatter_to_tp         keep this rank's slice (last)   all-gather (last dim)
gather_from_tp        all-gather (last dim)           keep this rank's slice
scatter_to_sp         keep this rank's slice (seq)    all-gather (seq dim)
all_gather_from_sp    all-gather (seq dim)            reduce-scatter (seq dim)
reduce_scatter_to_sp  reduce-scatter (seq dim)        all-gather (seq dim)
====================  ==============================  ==============================

Activations are ``[batch, seq, hidden]``; sequence parallelism splits dim 1 (``SEQ_DIM``). With a group of
one rank every function is the identity and nothing is communicated.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "SEQ_DIM",
    "all_gather_from_sp",
    "copy_to_tp",
    "gather_from_tp",
    "reduce_from_tp",
    "reduce_scatter_to_sp",
    "scatter_to_sp",
    "scatter_to_tp",
]

SEQ_DIM = 1


def _size(group: dist.ProcessGroup | None) -> int:
    # None is Topology.single()'s group: one rank, even inside an initialised world (a reference model built
    # in a test's rank, a plain model next to a distributed job). Never the default (whole-world) group.
    if group is None:
        return 1
    return dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)  # never reduce into a tensor autograd still needs
    dist.all_reduce(out, group=group)
    return out


def _split(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    size, rank = _size(group), dist.get_rank(group)
    if x.shape[dim] % size != 0:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} over {size} tensor-parallel ranks")
    return x.chunk(size, dim=dim)[rank].contiguous()


def _all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    size = _size(group)
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((size * moved.shape[0], *moved.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_single(out, moved, group=group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    size = _size(group)
    if x.shape[dim] % size != 0:
        raise ValueError(f"cannot reduce-scatter dim {dim} of size {x.shape[dim]} over {size} ranks")
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] // size, *moved.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_single(out, moved, group=group)
    return out.movedim(0, dim)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather(grad, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return _all_gather(x, -1, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _split(grad, -1, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return _split(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather(grad, SEQ_DIM, ctx.group), None


class _AllGatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return _all_gather(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _reduce_scatter(grad, SEQ_DIM, ctx.group), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather(grad, SEQ_DIM, ctx.group), None


def _apply(fn: type[torch.autograd.Function], x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if _size(group) == 1:
        return x
    out: torch.Tensor = fn.apply(x, group)  # type: ignore[no-untyped-call]
    return out


def copy_to_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Enter a tensor-parallel region with a replicated input: identity forward, all-reduce backward."""
    return _apply(_CopyToTP, x, group)


def reduce_from_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Leave a tensor-parallel region by summing partial results: all-reduce forward, identity backward."""
    return _apply(_ReduceFromTP, x, group)


def scatter_to_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Keep this rank's slice of the last dim; backward all-gathers."""
    return _apply(_ScatterToTP, x, group)


def gather_from_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather the last dim; backward keeps this rank's slice."""
    return _apply(_GatherFromTP, x, group)


def scatter_to_sp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Keep this rank's slice of the sequence (entering sequence parallelism); backward all-gathers."""
    return _apply(_ScatterToSP, x, group)


def all_gather_from_sp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather sequence shards before a column-parallel layer; backward reduce-scatters."""
    return _apply(_AllGatherFromSP, x, group)


def reduce_scatter_to_sp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum partial results and keep this rank's sequence shard (after a row-parallel layer)."""
    return _apply(_ReduceScatterToSP, x, group)
