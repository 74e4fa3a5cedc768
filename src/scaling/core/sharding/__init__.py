"""ZeRO stages 1-3 on FSDP2: the policy (which stage, offload, when to reshard), applying ``fully_shard``
to a stage's layers over the data-parallel group, and reading or writing a possibly sharded tensor."""

from scaling.core.sharding.fully_sharded import shard_stage
from scaling.core.sharding.policy import Offload, ReshardAfterForward, ShardingPolicy
from scaling.core.sharding.tensors import assign_full, gathered, is_sharded, local_part

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
