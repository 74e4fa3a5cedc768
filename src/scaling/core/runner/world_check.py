"""A world health check, and the default script of the launcher: every process group must communicate.

``python -m scaling.core.runner CONFIG`` with no ``runner.script`` starts this on the config's topology.
Each rank builds the topology, checks each of its groups with an all-reduce whose result is known in
advance, checks pipeline neighbours with a send/recv, checks the RNG streams, and measures the all-reduce
bandwidth of the data-parallel group. Rank 0 prints a summary and writes it to ``metrics.jsonl``.
Exit code 0 means the world is sound.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from scaling.core.engine_config import EngineConfig
from scaling.core.logging import MetricsLogger, configure_logging
from scaling.core.topology import RngTracker, Topology, TopologyConfig, init_distributed

__all__ = ["check_world", "main"]


def _check_group(name: str, group: dist.ProcessGroup | None, ranks: list[int], topology: Topology) -> None:
    if group is None:
        return
    value = torch.tensor([float(topology.global_rank)], device=topology.device)
    dist.all_reduce(value, group=group)
    if value.item() != sum(ranks):
        raise RuntimeError(f"{name} group {ranks}: all-reduce gave {value.item()}, expected {sum(ranks)}")


def check_world(topology: Topology, seed: int = 42, megabytes: float = 4.0) -> dict[str, float]:
    """Run every check on this rank; returns measurements (raises on the first failure)."""
    _check_group("tensor-parallel", topology.tp_group, topology.tp_ranks, topology)
    _check_group("data-parallel", topology.dp_group, topology.dp_ranks, topology)
    _check_group("pipeline", topology.pp_group, topology.pp_ranks, topology)
    _check_group("model", topology.model_group, topology.model_ranks, topology)
    _check_group("embedding", topology.embedding_group, topology.embedding_ranks, topology)
    token = torch.tensor([float(topology.global_rank)], device=topology.device)
    if topology.next_pipe_rank is not None:
        dist.send(token, topology.next_pipe_rank)
    if topology.prev_pipe_rank is not None:
        got = torch.empty_like(token)
        dist.recv(got, topology.prev_pipe_rank)
        if got.item() != topology.prev_pipe_rank:
            raise RuntimeError(f"pipeline recv from {topology.prev_pipe_rank} gave {got.item()}")
    tracker = RngTracker(seed, topology.coord, topology.device)
    with tracker.fork():
        tp_draw = torch.rand(4, device=topology.device)
    default_draw = torch.rand(4, device=topology.device)
    gathered = [torch.empty_like(default_draw) for _ in range(topology.tp_size)]
    dist.all_gather(gathered, default_draw, group=topology.tp_group)
    if not all(torch.equal(g, default_draw) for g in gathered):
        raise RuntimeError("default RNG streams differ between tensor-parallel ranks")
    dist.all_gather(gathered, tp_draw, group=topology.tp_group)
    if topology.tp_size > 1 and any(torch.equal(gathered[0], g) for g in gathered[1:]):
        raise RuntimeError("tensor-parallel RNG streams coincide between tensor-parallel ranks")

    payload = torch.ones(int(megabytes * 2**20 / 4), device=topology.device)
    dist.all_reduce(payload, group=topology.dp_group)  # warm-up
    start = time.perf_counter()
    repeats = 5
    for _ in range(repeats):
        dist.all_reduce(payload, group=topology.dp_group)
    if topology.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    dist.barrier()
    return {"dp_allreduce_ms": seconds * 1e3, "dp_allreduce_mb": megabytes}


def main(argv: list[str] | None = None) -> int:
    """One rank's world check; a failure reaches the launcher as one report (``run_as_worker``)."""
    from scaling.core.runner.worker import run_as_worker  # imports the checkpoint and data packages

    return run_as_worker(lambda: _check_this_rank(argv), "world check", int(os.environ.get("RANK", "0")))


def _check_this_rank(argv: list[str] | None) -> int:
    args = sys.argv[1:] if argv is None else argv
    config = EngineConfig.from_yaml(Path(args[0])) if args else EngineConfig()
    topology_config = config.topology
    if not args:  # launched without a config: take the world as it was started
        world = int(os.environ.get("WORLD_SIZE", "1"))
        topology_config = TopologyConfig(data_parallel_size=world)
    topology = init_distributed(topology_config)
    coord = (topology.pp_rank, topology.dp_rank, topology.tp_rank)
    logger = configure_logging(config.logger, topology.global_rank, coord)
    logger.info("topology %s", topology)
    measured = check_world(topology)
    if topology.global_rank == 0:
        with MetricsLogger(config.logger) as metrics:
            metrics.log(0, {"world_size": topology.world_size, **measured})
        logger.info(
            "world check passed: %d ranks (tp=%d, pp=%d, dp=%d), every group communicates; "
            "data-parallel all-reduce of %.0f MiB took %.2f ms",
            topology.world_size,
            topology.tp_size,
            topology.pp_size,
            topology.dp_size,
            measured["dp_allreduce_mb"],
            measured["dp_allreduce_ms"],
        )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
