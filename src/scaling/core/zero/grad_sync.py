"""What happens to gradients between the backward passes and the optimizer, behind one small protocol.

The schedule knows gradient synchronisation only through :class:`GradSync`: ``start`` before a step's
first forward, ``before_backward`` before each backward through a model chunk, ``finish`` after the last
one, then ``grad(name)`` is the final gradient of this rank's part of a parameter. After ``finish`` every
gradient is

* averaged over data-parallel ranks (started during backward, bucket by bucket or layer by layer);
* summed over tensor-parallel ranks where each holds only a partial sum (norm weights under sequence
  parallelism, replicated kv projections);
* summed over the pipeline stages holding copies of one tied weight (embedding and LM head).

Two implementations: :class:`BucketedAllReduce` (ZeRO stage 0: flat buckets all-reduced in place) and
:class:`FullyShardedGrads` (stages 1-3: FSDP2 reduce-scatters each layer's gradients into this rank's
shard, every micro-batch or, for stage 1, once per step). The model-parallel sums are the same for both:
they are sums, so they commute with the data-parallel mean and apply to full gradients and shards alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from scaling.core.pipeline.grad_reduce import GradReducer
from scaling.core.zero.tensors import local_part

__all__ = ["BucketedAllReduce", "CallerReducedGrads", "FullyShardedGrads", "GradSync", "ModelParallelSums"]


class GradSync(Protocol):
    def start(self, n_micro: int) -> None:
        """Before the step's first forward: forget the previous step's gradients."""

    def before_backward(self, chunk: int, last: bool) -> None:
        """Before a micro-batch's backward through model chunk ``chunk``; ``last``: its last of the step."""

    def finish(self) -> None:
        """After the step's last backward: make every gradient final."""

    def grad(self, name: str) -> torch.Tensor | None:
        """The final gradient of this rank's part of parameter ``name`` (None if it got none)."""


@dataclass
class ModelParallelSums:
    """Sums over tensor-parallel ranks (partial gradients) and over the stages holding a tied weight."""

    tp_group: dist.ProcessGroup | None
    partial_over_tp: list[str] = field(default_factory=list)
    tied: list[tuple[list[str], dist.ProcessGroup]] = field(default_factory=list)

    def apply(self, grad: Callable[[str], torch.Tensor | None]) -> None:
        for name in self.partial_over_tp:
            if (g := grad(name)) is not None:
                dist.all_reduce(g, group=self.tp_group)
        for names, group in self.tied:
            for name in names:
                if (g := grad(name)) is not None:
                    dist.all_reduce(g, group=group)


class BucketedAllReduce:
    """ZeRO stage 0: gradients live in flat buckets, each all-reduced as soon as it is complete."""

    def __init__(self, reducer: GradReducer, uses: Mapping[str, int], sums: ModelParallelSums) -> None:
        self.reducer = reducer
        self.uses = dict(uses)
        self.sums = sums

    def start(self, n_micro: int) -> None:
        self.reducer.zero(n_micro, self.uses)

    def before_backward(self, chunk: int, last: bool) -> None:
        pass  # the buckets' hooks count accumulations themselves

    def finish(self) -> None:
        self.reducer.finish()
        self.sums.apply(self.grad)

    def grad(self, name: str) -> torch.Tensor | None:
        return self.reducer.main_grad(name) if self.reducer.holds(name) else None


class FullyShardedGrads:
    """ZeRO stages 1-3: FSDP2 reduce-scatters each unit's gradients into this rank's shard.

    Stage 1 accumulates unsharded gradients over the micro-batches and lets a unit reduce only in its
    chunk's last backward of the step; stages 2 and 3 reduce after every backward.
    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        chunk_units: Mapping[int, Sequence[nn.Module]],
        sync_every_micro_batch: bool,
        sums: ModelParallelSums,
    ) -> None:
        self._params = dict(params)  # FSDP2's sharded parameters, fixed once the module is built
        self.chunk_units = {
            chunk: [u for u in units if isinstance(u, FSDPModule)] for chunk, units in chunk_units.items()
        }
        self.sync_every_micro_batch = sync_every_micro_batch
        self.sums = sums

    def _set_sync(self, units: Sequence[FSDPModule], value: bool) -> None:
        for unit in units:
            unit.set_requires_gradient_sync(value, recurse=False)

    def start(self, n_micro: int) -> None:
        for p in self._params.values():
            p.grad = None
        sync = self.sync_every_micro_batch or n_micro == 1
        for units in self.chunk_units.values():
            self._set_sync(units, sync)

    def before_backward(self, chunk: int, last: bool) -> None:
        if last and not self.sync_every_micro_batch:
            self._set_sync(self.chunk_units.get(chunk, []), True)

    def finish(self) -> None:
        self.sums.apply(self.grad)

    def grad(self, name: str) -> torch.Tensor | None:
        p = self._params.get(name)
        return None if p is None or p.grad is None else local_part(p.grad)


class CallerReducedGrads:
    """Stage 0 when the caller reduces over data-parallel ranks (``DistributedDataParallel`` around the
    module in a plain loop): gradients are the parameters' own ``.grad``; only the model-parallel sums are
    left to :meth:`finish`."""

    def __init__(self, params: Mapping[str, nn.Parameter], sums: ModelParallelSums) -> None:
        self._params = dict(params)
        self.sums = sums

    def start(self, n_micro: int) -> None:
        for p in self._params.values():
            p.grad = None

    def before_backward(self, chunk: int, last: bool) -> None:
        pass

    def finish(self) -> None:
        self.sums.apply(self.grad)

    def grad(self, name: str) -> torch.Tensor | None:
        p = self._params.get(name)
        return None if p is None else p.grad
