"""Reading and writing parameters that may be FSDP2 shards (``DTensor`` over the data-parallel mesh).

Checkpoints, conversion and the optimizer's state dicts work with each rank's *tensor-parallel* slice,
full over data-parallel ranks; these helpers are the one place that knows how to get there from a shard
and back. Gathering is collective over the data-parallel group and happens one tensor at a time, so no
rank ever holds more than one gathered parameter beyond its shards.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["assign_full", "gathered", "is_sharded", "local_part"]


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ranks hold different parts of ``tensor`` (a replicated DTensor, as FSDP2's ``replicate`` makes
    them for stage 0 in a plain loop, is whole on every rank)."""
    return isinstance(tensor, DTensor) and any(placement.is_shard() for placement in tensor.placements)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """The part this rank stores: the local shard of a DTensor, the tensor itself otherwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's tensor-parallel slice, full over data-parallel ranks (collective over dp when sharded)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def assign_full(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` (full over data-parallel ranks) into ``target``, keeping only this rank's shard when
    ``target`` is sharded. Local: every data-parallel rank passes the same ``value``."""
    if isinstance(target, DTensor):
        value = value.to(dtype=target.dtype, device=target.to_local().device)
        shard = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(shard.to_local())
    else:
        target.copy_(value.to(dtype=target.dtype, device=target.device))
