"""The spawn harness itself: results come back, failures name their rank, hangs end in seconds."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from scaling.core.testing import DistributedTestFailure, DistributedTimeout, run_distributed


def _all_reduce_round_trip(offset: float) -> dict[str, object]:
    rank, world = dist.get_rank(), dist.get_world_size()
    summed = torch.tensor([rank + offset])
    dist.all_reduce(summed)
    gathered = torch.empty(world)
    dist.all_gather_single(gathered, torch.tensor([float(rank)]))
    return {"rank": rank, "world": world, "sum": summed, "gathered": gathered}


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_collective_round_trip(world_size: int) -> None:
    results = run_distributed(_all_reduce_round_trip, world_size, 1.0)
    expected_sum = sum(r + 1.0 for r in range(world_size))
    assert [r["rank"] for r in results] == list(range(world_size))
    for result in results:
        assert result["world"] == world_size
        assert result["sum"].item() == expected_sum
        torch.testing.assert_close(result["gathered"], torch.arange(world_size, dtype=torch.float32))


def _rank_one_raises() -> int:
    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank one")
    dist.barrier()  # the healthy ranks block here until the harness kills them
    return 0


def test_failing_rank_is_reported_with_its_traceback() -> None:
    with pytest.raises(DistributedTestFailure) as info:
        run_distributed(_rank_one_raises, 3, timeout_s=30)
    assert info.value.failed_ranks[0] == 1  # the root cause first; peers may fail in their barrier after it
    message = str(info.value)
    assert "rank 1 of 3 failed" in message
    assert "ValueError: deliberate failure on rank one" in message
    assert "_rank_one_raises" in message  # the worker's own traceback, not the harness's


def _rank_zero_hangs() -> int:
    if dist.get_rank() == 0:
        time.sleep(3600)
    return 1


def test_hang_times_out_and_kills_the_world() -> None:
    start = time.monotonic()
    with pytest.raises(DistributedTimeout) as info:
        run_distributed(_rank_zero_hangs, 2, timeout_s=3)
    assert time.monotonic() - start < 20
    assert info.value.failed_ranks == [0]
    assert "ranks [0] did not finish" in str(info.value)


def _rank_one_dies() -> int:
    if dist.get_rank() == 1:
        os._exit(7)
    dist.barrier()
    return 0


def test_rank_that_dies_without_reporting_is_a_failure() -> None:
    with pytest.raises(DistributedTestFailure) as info:
        run_distributed(_rank_one_dies, 2, timeout_s=30)
    assert info.value.failed_ranks.count(1) == 1  # the rank that died is reported, once
    assert "exited with code 7" in str(info.value)
