"""The distributed data loader: each optimizer step's micro-batches for this rank, resumable exactly.

Per epoch the sample order is a permutation seeded by (seed, epoch). A step consumes one global batch of
``micro_batch_size x gradient_accumulation_steps x dp`` consecutive samples of that order; data-parallel
rank d takes the d-th contiguous share and splits it into micro-batches, so the global batch (and hence
training) does not depend on dp. Only tensor-parallel rank 0 reads; it broadcasts each micro-batch to its
tp group. Stages between the first and the last pipeline stage read nothing (they receive activations).
The position is one integer (samples consumed), saved in and restored from checkpoints.

Background reader processes (``num_workers > 0``) are forked from the rank, so torch's watchdog ends them
when the rank dies, and are shut down by ``close()``, by leaving a ``with`` block, when the loader is
garbage collected, and at interpreter exit: a finished run or test leaves no process behind.
"""

from __future__ import annotations

import multiprocessing
import weakref
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from scaling.core.data.dataset import Dataset
from scaling.core.data.memory_map import DataFileError
from scaling.core.pipeline.p2p import ActivationHeader, decode_dtype
from scaling.core.topology.topology import Topology

__all__ = ["DistributedDataLoader", "broadcast_pytree"]


def broadcast_pytree(value: Any, src: int, group: dist.ProcessGroup, device: torch.device) -> Any:
    """Send a pytree of tensors from global rank ``src`` to every rank of ``group`` (others pass None)."""
    if dist.get_world_size(group) == 1:
        return value
    if dist.get_rank() == src:
        leaves, spec = pytree.tree_flatten(value)
        header = ActivationHeader(
            pytree.treespec_dumps(spec), [list(t.shape) for t in leaves], [str(t.dtype) for t in leaves], []
        ).encode()
        length = torch.tensor([header.numel()], dtype=torch.int64, device=device)
        dist.broadcast(length, src, group=group)
        dist.broadcast(header.to(device), src, group=group)
        for leaf in leaves:
            dist.broadcast(leaf.to(device).contiguous(), src, group=group)
        return value
    length = torch.empty(1, dtype=torch.int64, device=device)
    dist.broadcast(length, src, group=group)
    raw = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    dist.broadcast(raw, src, group=group)
    received = ActivationHeader.decode(raw.cpu())
    tensors = []
    for shape, dtype in zip(received.shapes, received.dtypes, strict=True):
        leaf = torch.empty(shape, dtype=decode_dtype(dtype), device=device)
        dist.broadcast(leaf, src, group=group)
        tensors.append(leaf)
    return pytree.tree_unflatten(tensors, pytree.treespec_loads(received.spec))


# Forked workers are children of the rank, so torch's worker watchdog ends them when the rank dies; a
# forkserver (what a rank started by a forkserver inherits) would be their parent and outlive the rank.
_WORKER_START = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def _shutdown_workers(workers: Iterator[Any]) -> None:
    shutdown = getattr(workers, "_shutdown_workers", None)  # torch's multi-process iterator
    if shutdown is not None:
        shutdown()


class _Indexable(torch.utils.data.Dataset[Any]):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]


class DistributedDataLoader:
    def __init__(
        self,
        dataset: Dataset,
        topology: Topology,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
    ) -> None:
        """``num_workers > 0`` reads (and collates) in that many background processes, ahead of use."""
        config = topology.config
        self.dataset = dataset
        self.topology = topology
        self.seed = seed
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.micro_batch_size = config.micro_batch
        self.micro_batches = config.micro_batches
        self.global_batch = config.global_batch
        if len(dataset) < self.global_batch:
            source = getattr(dataset, "source", None) or type(dataset).__name__
            raise DataFileError(
                f"{source}: {len(dataset)} samples, fewer than one global batch ({self.global_batch} = micro batch "
                f"{self.micro_batch_size} x {self.micro_batches} micro-batches x data parallel)"
            )
        self.consumed = 0  # samples consumed over all epochs (all data-parallel ranks together)
        self._order_epoch = -1
        self._order: torch.Tensor | None = None
        self._workers: Iterator[Any] | None = None  # worker-process reader, started at self.consumed
        self._stop_workers: weakref.finalize[Any, Any] | None = None  # shuts the reader's processes down, once

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch  # the incomplete last batch of an epoch is dropped

    def _order_for(self, epoch: int) -> torch.Tensor:
        if self._order_epoch != epoch or self._order is None:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._order = torch.randperm(len(self.dataset), generator=generator)
            else:
                self._order = torch.arange(len(self.dataset))
            self._order_epoch = epoch
        return self._order

    def _indices_at(self, consumed: int) -> list[list[int]]:
        """This rank's micro-batch sample indices for the step that starts after ``consumed`` samples."""
        step = consumed // self.global_batch
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        order = self._order_for(epoch)
        start = step_in_epoch * self.global_batch + self.topology.dp_rank * self.micro_batch_size * self.micro_batches
        mine = order[start : start + self.micro_batch_size * self.micro_batches].tolist()
        return [mine[m * self.micro_batch_size : (m + 1) * self.micro_batch_size] for m in range(self.micro_batches)]

    def _micro_batch_indices_from(self, consumed: int) -> Iterator[list[int]]:
        while True:
            yield from self._indices_at(consumed)
            consumed += self.global_batch

    def _read(self, indices: list[list[int]]) -> list[Any]:
        if self.num_workers == 0:
            return [self.dataset.collate([self.dataset[i] for i in micro]) for micro in indices]
        if self._workers is None:  # background processes read ahead from the current position
            loader = torch.utils.data.DataLoader(
                _Indexable(self.dataset),
                batch_sampler=self._micro_batch_indices_from(self.consumed),
                collate_fn=self.dataset.collate,
                num_workers=self.num_workers,
                multiprocessing_context=_WORKER_START,
            )
            self._workers = iter(loader)
            # Not a method of self: the finalizer must not keep the loader alive.
            self._stop_workers = weakref.finalize(self, _shutdown_workers, self._workers)
        return [next(self._workers) for _ in indices]

    def _reads(self) -> bool:
        topo = self.topology
        return topo.is_first_pipe_stage or topo.is_last_pipe_stage

    def next_batches(self) -> list[Any]:
        """The micro-batches of this rank for the next optimizer step (None on stages that need no data)."""
        indices = self._indices_at(self.consumed)
        topo = self.topology
        if not self._reads():
            self.consumed += self.global_batch
            return [None] * len(indices)
        local = self._read(indices) if topo.tp_rank == 0 else [None] * len(indices)
        self.consumed += self.global_batch
        return [broadcast_pytree(batch, topo.tp_src_rank, topo.tp_group, topo.device) for batch in local]

    def __iter__(self) -> Iterator[list[Any]]:
        while True:
            yield self.next_batches()

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data loader state was saved with seed {state['seed']}, this run uses {self.seed}")
        if state["consumed"] % self.global_batch != 0:
            raise ValueError(
                f"data loader state consumed {state['consumed']} samples, not a multiple of the global batch "
                f"({self.global_batch}): the global batch size changed"
            )
        self.consumed = int(state["consumed"])
        self.close()  # restart the readers at the restored position

    def close(self) -> None:
        """Stop the background reader processes (if any); reading again later starts new ones."""
        if self._stop_workers is not None:
            self._stop_workers()
        self._stop_workers = None
        self._workers = None

    def __enter__(self) -> DistributedDataLoader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
