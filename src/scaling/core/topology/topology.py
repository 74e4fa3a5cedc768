"""``Topology``: this rank's coordinates, its process groups and its device, passed explicitly to whoever
needs them (no module-level globals).

The rank arithmetic lives in :mod:`scaling.core.topology.rank_math`; this class only binds it to a running
``torch.distributed`` world.
"""

from __future__ import annotations

import os
import signal
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous

from scaling.core.runner.lifetime import die_with_parent
from scaling.core.topology.config import TopologyConfig
from scaling.core.topology.device import choose_device_for_this_process
from scaling.core.topology.rank_math import (
    Coord,
    ParallelSizes,
    coord_of,
    data_parallel_groups,
    embedding_groups,
    model_parallel_groups,
    pipe_parallel_groups,
    rank_of,
    tensor_parallel_groups,
)

__all__ = ["Topology", "init_distributed", "shutdown_distributed"]


class Topology:
    """The (pp, dp, tp) layout bound to the current process group.

    Every rank must construct it (group creation is collective): all groups are created in the same order
    on every rank, and each rank keeps the ones it belongs to.
    """

    def __init__(self, config: TopologyConfig, device: torch.device | str | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "Topology needs an initialised torch.distributed process group; "
                "call scaling.core.topology.init_distributed(config) first"
            )
        world = dist.get_world_size()
        if world != config.n_ranks:
            raise RuntimeError(
                f"topology.world_size ({config.n_ranks}) = tp ({config.tp}) x pp ({config.pp}) x dp ({config.dp}) "
                f"does not match the {world} processes that were launched"
            )
        self.config = config
        self.sizes = ParallelSizes(tp=config.tp, dp=config.dp, pp=config.pp)
        self.global_rank = dist.get_rank()
        self.coord: Coord = coord_of(self.global_rank, self.sizes)
        self.device = torch.device(device) if device is not None else _default_device()
        self.backend: str = dist.get_backend()

        self.tp_ranks, self.tp_group = self._create_member(tensor_parallel_groups(self.sizes))
        self.dp_ranks, self.dp_group = self._create_member(data_parallel_groups(self.sizes))
        self.pp_ranks, self.pp_group = self._create_member(pipe_parallel_groups(self.sizes))
        self.model_ranks, self.model_group = self._create_member(model_parallel_groups(self.sizes))
        emb_ranks, emb_group = self.create_groups(embedding_groups(self.sizes))
        self.embedding_ranks: list[int] = emb_ranks
        self.embedding_group: dist.ProcessGroup | None = emb_group

    @classmethod
    def single(cls, config: TopologyConfig | None = None, device: torch.device | str = "cpu") -> Topology:
        """One process and no ``torch.distributed`` at all: a plain model (``scaling.transformer.Transformer``)
        runs on it in a script, a notebook or a test with no process group.

        Every group is ``None``; the communication pairs of ``scaling.core.nn`` are identities over a group
        of one, so the parallel layers compute what they compute on one rank of a launched world.
        """
        config = config or TopologyConfig()
        if config.n_ranks != 1:
            raise ValueError(f"Topology.single() is one process, but the config has {config.n_ranks} ranks")
        topology = cls.__new__(cls)
        topology.config = config
        topology.sizes = ParallelSizes(tp=1, dp=1, pp=1)
        topology.global_rank = 0
        topology.coord = coord_of(0, topology.sizes)
        topology.device = torch.device(device)
        topology.backend = "none"
        for family in ("tp", "dp", "pp", "model"):
            setattr(topology, f"{family}_ranks", [0])
            setattr(topology, f"{family}_group", None)
        topology.embedding_ranks, topology.embedding_group = [], None
        return topology

    def create_groups(self, groups: list[list[int]]) -> tuple[list[int], dist.ProcessGroup | None]:
        """Create every group of a family (a collective: all ranks call it with the same list, in the same
        order) and return the ranks and group this rank belongs to, if any."""
        mine: tuple[list[int], dist.ProcessGroup | None] = ([], None)
        for ranks in groups:
            # Collective: every rank creates every group, in the same order. The timeout is not inherited
            # from the world group: without it a stalled peer blocks the others for torch's default.
            group = dist.new_group(ranks, timeout=timedelta(seconds=self.config.collective_timeout_s))
            if self.global_rank in ranks:
                mine = (ranks, group)
        return mine

    def _create_member(self, groups: list[list[int]]) -> tuple[list[int], dist.ProcessGroup]:
        ranks, group = self.create_groups(groups)
        if group is None:
            raise AssertionError(f"rank {self.global_rank} is in none of {groups}")
        return ranks, group

    # Coordinates and sizes -------------------------------------------------------------------------
    @property
    def tp_rank(self) -> int:
        return self.coord.tp

    @property
    def dp_rank(self) -> int:
        return self.coord.dp

    @property
    def pp_rank(self) -> int:
        return self.coord.pp

    @property
    def tp_size(self) -> int:
        return self.sizes.tp

    @property
    def dp_size(self) -> int:
        return self.sizes.dp

    @property
    def pp_size(self) -> int:
        return self.sizes.pp

    @property
    def world_size(self) -> int:
        return self.sizes.world

    # Pipeline neighbours ---------------------------------------------------------------------------
    @property
    def is_first_pipe_stage(self) -> bool:
        return self.coord.pp == 0

    @property
    def is_last_pipe_stage(self) -> bool:
        return self.coord.pp == self.sizes.pp - 1

    @property
    def prev_pipe_rank(self) -> int | None:
        """Global rank of the previous stage in this pipeline, or None on the first stage."""
        if self.is_first_pipe_stage:
            return None
        return rank_of(Coord(self.coord.pp - 1, self.coord.dp, self.coord.tp), self.sizes)

    @property
    def next_pipe_rank(self) -> int | None:
        """Global rank of the next stage in this pipeline, or None on the last stage."""
        if self.is_last_pipe_stage:
            return None
        return rank_of(Coord(self.coord.pp + 1, self.coord.dp, self.coord.tp), self.sizes)

    @property
    def tp_src_rank(self) -> int:
        """Global rank of tp rank 0 in this rank's tp group: the one that reads data and broadcasts it."""
        return self.tp_ranks[0]

    def __repr__(self) -> str:
        c = self.coord
        return (
            f"Topology(rank={self.global_rank}/{self.world_size}, pp={c.pp}/{self.pp_size}, "
            f"dp={c.dp}/{self.dp_size}, tp={c.tp}/{self.tp_size}, device={self.device}, backend={self.backend})"
        )


def _default_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(config: TopologyConfig, *, timeout_s: float | None = None) -> Topology:
    """Initialise ``torch.distributed`` from the launcher's environment and build the topology.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` (set by ``torch.distributed.run``);
    without them a single process initialises a world of one, so the same code runs unlaunched. A launched
    process dies with its launcher (SIGTERM when the launcher exits: it saves and stops like on any SIGTERM).
    Collectives time out after ``timeout_s`` (default ``config.collective_timeout_s``).
    """
    if "RANK" in os.environ:
        die_with_parent(signal.SIGTERM)
    if timeout_s is None:
        timeout_s = config.collective_timeout_s
    choice = choose_device_for_this_process(config.device)
    device = torch.device(choice.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            if attempt in ("", "0"):
                dist.init_process_group(choice.backend, timeout=timeout)
            else:  # a restart: the launcher's store (a fixed runner.master_port) still holds the last attempt's keys
                store, rank, world_size = next(rendezvous("env://", timeout=timeout))
                store = dist.PrefixStore(f"scaling/attempt{attempt}", store)  # type: ignore[attr-defined]
                dist.init_process_group(choice.backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        else:
            store = dist.HashStore()  # type: ignore[attr-defined]
            dist.init_process_group(choice.backend, store=store, rank=0, world_size=1, timeout=timeout)
    return Topology(config, device=device)


def shutdown_distributed() -> None:
    """Leave the world cleanly: wait for every rank, then tear the process groups down.

    A rank that exits while its gloo groups are alive (other ranks still finishing a collective, or
    the interpreter destroying groups in arbitrary order) can abort in the groups' worker threads
    ("terminate called without an active exception"), failing a run that had finished its work.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
