"""ZeRO stages 0-3: the policy (which stage, offload, when to reshard), applying FSDP2's ``fully_shard``
to a stage's layers over the data-parallel group, and reading or writing a possibly sharded tensor."""

from scaling.core.zero.fully_sharded import shard_stage
from scaling.core.zero.policy import Offload, ReshardAfterForward, ShardingPolicy
from scaling.core.zero.tensors import assign_full, gathered, is_sharded, local_part

__all__ = [
    "Offload",
    "ReshardAfterForward",
    "ShardingPolicy",
    "assign_full",
    "gathered",
    "is_sharded",
    "local_part",
    "shard_stage",
]
