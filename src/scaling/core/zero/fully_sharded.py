"""Apply FSDP2's ``fully_shard`` (or, for stage 0 in a plain loop, ``replicate``) to one pipeline stage's
layers over the data-parallel group only.

One FSDP unit per layer, so at most one layer is gathered at a time under stage 3; a weight shared by two
layers on this rank (the tied embedding and LM head) puts both layers in one unit, which FSDP2 requires
of a shared parameter. Tensor-parallel slices are plain tensors to FSDP2: each tp rank shards its own
slice over its data-parallel peers, and the tensor-parallel collectives of the layers run on the gathered
slice as before. The ``root`` (the module whose forward runs a chunk of layers) is sharded last, with no
parameters of its own, so FSDP2 has one root per stage that orders the units' communication.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from scaling.core.zero.policy import Offload, ShardingPolicy

__all__ = ["shard_stage"]


def shard_stage(
    root: nn.Module,
    units: Sequence[Sequence[nn.Module]],
    *,
    group: dist.ProcessGroup,
    device: torch.device,
    policy: ShardingPolicy,
    compute_dtype: torch.dtype,
    reduce_dtype: torch.dtype | None,
    keep_gathered: Sequence[int] = (),
) -> list[nn.Module]:
    """Shard every unit (a list of layers that share parameters), then the root; return the unit modules
    that FSDP2 now manages (the first layer of each unit), for setting per-unit gradient sync.

    ``keep_gathered``: positions in ``units`` that stay gathered after forward even when the policy
    reshards (the last layer of a chunk: its backward follows at once, so freeing it would only gather
    it again)."""
    mesh = DeviceMesh.from_group(group, device_type=device.type)
    mixed = MixedPrecisionPolicy(
        param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
        reduce_dtype=reduce_dtype,
    )
    offload: OffloadPolicy = (
        CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if policy.offload == Offload.CPU else OffloadPolicy()
    )
    managed: list[nn.Module] = []
    for position, unit in enumerate(units):
        reshard = policy.reshard and position not in keep_gathered
        modules = list(unit)
        if not any(True for m in modules for _ in m.parameters()):
            continue
        target: nn.Module | list[nn.Module] = modules if len(modules) > 1 else modules[0]
        if policy.replicate:
            replicate(target, mesh=mesh, mp_policy=mixed, offload_policy=offload)
        else:
            fully_shard(target, mesh=mesh, reshard_after_forward=reshard, mp_policy=mixed, offload_policy=offload)
        managed.extend(modules)
    if policy.replicate:
        replicate(root, mesh=mesh, mp_policy=mixed, offload_policy=offload)
    else:
        fully_shard(root, mesh=mesh, reshard_after_forward=policy.reshard, mp_policy=mixed, offload_policy=offload)
    return managed
