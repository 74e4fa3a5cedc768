"""Which ZeRO stage a run uses, and what that means for FSDP2.

* stage 0: no sharding; gradients are averaged by the bucketed all-reduce, the optimizer keeps full fp32
  masters (the engine's own path, fastest when memory allows);
* stage 1: fp32 masters and Adam states sharded over data-parallel ranks; gradients accumulate unsharded
  over the micro-batches and are reduce-scattered once per step; parameters stay gathered from forward
  to backward;
* stage 2: as 1, but gradients are reduce-scattered after every micro-batch, so only shards accumulate;
* stage 3: as 2, and parameters are resharded after each layer's forward, gathered again for backward.

A plain PyTorch loop (``scaling.llama``) cannot use the buckets at stage 0: nobody calls the engine's
``finish()`` between ``loss.backward()`` and ``optimizer.step()``, so the all-reduce must complete inside
backward. In bf16/fp16 it runs FSDP2's ``replicate`` (``replicate=True``), which keeps fp32 parameters (what a
plain ``torch.optim`` optimizer updates) while computing in the narrow dtype; in fp32 the caller wraps the
module in ``DistributedDataParallel`` (``reduced_by_caller=True``), whose in-place buckets are faster.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["Offload", "ReshardAfterForward", "ShardingPolicy"]


class Offload(str, Enum):
    NONE = "none"
    CPU = "cpu"


class ReshardAfterForward(str, Enum):
    AUTO = "auto"  # stage 3 reshards, stages 1 and 2 keep parameters gathered until backward
    ALWAYS = "always"
    NEVER = "never"


@dataclass(frozen=True)
class ShardingPolicy:
    stage: int = 0
    offload: Offload = Offload.NONE
    reshard_after_forward: ReshardAfterForward = ReshardAfterForward.AUTO
    replicate: bool = False  # stage 0 only: FSDP2's replicate instead of the bucketed all-reduce
    reduced_by_caller: bool = False  # stage 0 only: no reduction here (the caller's DDP does it)

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.stage}")
        if (self.replicate or self.reduced_by_caller) and self.stage != 0:
            raise ValueError(f"replicate and reduced_by_caller are stage 0's alternatives; stage {self.stage} shards")
        if self.replicate and self.reduced_by_caller:
            raise ValueError("replicate and reduced_by_caller exclude each other")

    @property
    def sharded(self) -> bool:
        return self.stage >= 1

    @property
    def uses_fsdp(self) -> bool:
        """Whether FSDP2 manages the parameters (fp32 masters as DTensors, gradients reduced in backward)."""
        return self.sharded or self.replicate

    @property
    def reshard(self) -> bool:
        """Whether FSDP2 frees a layer's gathered parameters right after its forward."""
        if self.reshard_after_forward == ReshardAfterForward.AUTO:
            return self.stage == 3
        return self.reshard_after_forward == ReshardAfterForward.ALWAYS

    @property
    def sync_every_micro_batch(self) -> bool:
        """Stage 1 reduce-scatters once per step; stages 2 and 3 after every micro-batch."""
        return self.stage >= 2
