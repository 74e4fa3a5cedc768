"""TopologyConfig inference and validation, device choice, and process groups inside a real 8-rank world."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
import torch.distributed as dist

from scaling.core.config import ConfigError
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig, choose_device
from scaling.core.topology.rank_math import (
    coord_of,
    data_parallel_groups,
    embedding_groups,
    model_parallel_groups,
    pipe_parallel_groups,
    tensor_parallel_groups,
)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, (1, 1, 1, 1, 1, 1, 1)),
        ({"world_size": 8, "model_parallel_size": 2}, (2, 1, 4, 8, 4, 1, 1)),
        ({"data_parallel_size": 2, "pipe_parallel_size": 2}, (1, 2, 2, 4, 2, 1, 1)),
        ({"world_size": 4, "global_batch_size": 16, "micro_batch_size": 2}, (1, 1, 4, 4, 16, 2, 2)),
        ({"world_size": 2, "global_batch_size": 8, "gradient_accumulation_steps": 2}, (1, 1, 2, 2, 8, 2, 2)),
        ({"world_size": 2, "micro_batch_size": 3, "gradient_accumulation_steps": 4}, (1, 1, 2, 2, 24, 3, 4)),
        ({"world_size": 2, "global_batch_size": 6}, (1, 1, 2, 2, 6, 3, 1)),
        ({"world_size": 2, "micro_batch_size": 5}, (1, 1, 2, 2, 10, 5, 1)),
    ],
)  # fmt: skip
def test_sizes_and_batch_trio_are_inferred(given: dict[str, int], expected: tuple[int, ...]) -> None:
    """``expected`` is (tp, pp, dp, world, global batch, micro batch, accumulation steps)."""
    c = TopologyConfig.from_dict(given)
    assert (c.tp, c.pp, c.dp, c.n_ranks, c.global_batch, c.micro_batch, c.micro_batches) == expected


@pytest.mark.parametrize(
    ("given", "field", "fragment"),
    [
        ({"world_size": 6, "model_parallel_size": 4}, "world_size", "not divisible"),
        ({"world_size": 8, "data_parallel_size": 2}, "world_size", "!= model_parallel_size (1)"),
        ({"global_batch_size": 8, "micro_batch_size": 3, "gradient_accumulation_steps": 2}, "global_batch_size", "!="),
        ({"global_batch_size": 10, "micro_batch_size": 4}, "gradient_accumulation_steps", "cannot infer"),
        ({"global_batch_size": 10, "gradient_accumulation_steps": 4}, "micro_batch_size", "cannot infer"),
        ({"pipe_parallel_size": 2, "pipe_partition_method": [3]}, "pipe_partition_method", "one layer count per stage"),
        ({"pipe_parallel_size": 2, "pipe_partition_method": [3, 0]}, "pipe_partition_method", "at least one layer"),
        ({"pipe_partition_method": "round_robin"}, "pipe_partition_method", "round_robin"),
        ({"model_parallel_size": 0}, "model_parallel_size", "greater than or equal to 1"),
        ({"activation_checkpointing_type": "sometimes"}, "activation_checkpointing_type", "every_layer"),
        ({"device": "tpu"}, "device", "'cuda'"),
    ],
)
def test_bad_topology_names_the_field(given: dict[str, Any], field: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        TopologyConfig.from_dict(given)
    assert f"{field}:" in str(info.value)
    assert fragment in str(info.value)


def test_device_choice() -> None:
    assert choose_device("auto", cuda_available=False, cuda_count=0, local_rank=3).backend == "gloo"
    assert choose_device("cpu", cuda_available=True, cuda_count=8, local_rank=3).device == "cpu"
    gpu = choose_device("auto", cuda_available=True, cuda_count=8, local_rank=3)
    assert (gpu.device, gpu.backend) == ("cuda:3", "nccl")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        choose_device("cuda", cuda_available=False, cuda_count=0, local_rank=0)
    with pytest.raises(RuntimeError, match="LOCAL_RANK 4 has no GPU"):
        choose_device("cuda", cuda_available=True, cuda_count=4, local_rank=4)


LAYOUTS_OF_8 = [(tp, pp, dp) for tp, pp, dp in itertools.product([1, 2, 4, 8], repeat=3) if tp * pp * dp == 8]


def _check_groups(layouts: list[tuple[int, int, int]]) -> list[str]:
    """Inside one 8-rank world, build each layout's topology and check every group by a collective."""
    checked = []
    for tp, pp, dp in layouts:
        config = TopologyConfig(model_parallel_size=tp, pipe_parallel_size=pp, data_parallel_size=dp)
        topo = Topology(config)
        rank = dist.get_rank()
        sizes = topo.sizes
        assert topo.coord == coord_of(rank, sizes)
        families = {
            "tp": (topo.tp_group, tensor_parallel_groups(sizes)),
            "dp": (topo.dp_group, data_parallel_groups(sizes)),
            "pp": (topo.pp_group, pipe_parallel_groups(sizes)),
            "model": (topo.model_group, model_parallel_groups(sizes)),
            "embedding": (topo.embedding_group, embedding_groups(sizes)),
        }
        for name, (group, all_groups) in families.items():
            expected = next((g for g in all_groups if rank in g), None)
            if expected is None:
                assert group is None, f"{name}: rank {rank} should be in no group"
                continue
            assert group is not None
            assert dist.get_process_group_ranks(group) == expected, name
            # The group really connects exactly these ranks: a sum over it equals the sum of their ids.
            total = torch.tensor([float(rank)])
            dist.all_reduce(total, group=group)
            assert total.item() == sum(expected), f"{name} all_reduce over {expected} gave {total.item()}"
        assert topo.is_first_pipe_stage == (topo.pp_rank == 0)
        assert topo.is_last_pipe_stage == (topo.pp_rank == pp - 1)
        if pp > 1:
            nxt = torch.tensor([float(rank)])
            if topo.next_pipe_rank is not None:
                dist.send(nxt, topo.next_pipe_rank)
            if topo.prev_pipe_rank is not None:
                got = torch.empty(1)
                dist.recv(got, topo.prev_pipe_rank)
                assert got.item() == topo.prev_pipe_rank
                assert coord_of(topo.prev_pipe_rank, sizes).pp == topo.pp_rank - 1
        assert topo.tp_src_rank == topo.tp_ranks[0]
        checked.append(f"tp{tp}pp{pp}dp{dp}")
    return checked


def test_process_groups_for_every_layout_of_8_ranks() -> None:
    assert len(LAYOUTS_OF_8) == 10
    results = run_distributed(_check_groups, 8, LAYOUTS_OF_8, timeout_s=120)
    assert all(r == [f"tp{tp}pp{pp}dp{dp}" for tp, pp, dp in LAYOUTS_OF_8] for r in results)


def _topology_world_mismatch() -> str:
    try:
        Topology(TopologyConfig(model_parallel_size=4))
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def test_topology_rejects_a_world_of_the_wrong_size() -> None:
    messages = run_distributed(_topology_world_mismatch, 2)
    assert all("does not match the 2 processes" in m for m in messages)
