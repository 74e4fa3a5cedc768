"""RNG tracker: tensor-parallel streams differ per tp rank, default streams agree, and both replay."""

from __future__ import annotations

import torch
import torch.distributed as dist

from scaling.core.testing import run_distributed
from scaling.core.topology import Coord, RngTracker, Topology, TopologyConfig, seed_for


def test_seed_for_separates_regions_and_stages_but_not_replicas() -> None:
    c = Coord(pp=0, dp=0, tp=0)
    assert seed_for(1, c, "default") == seed_for(1, Coord(0, 3, 1), "default")  # same on tp and dp peers
    assert seed_for(1, c, "default") != seed_for(1, Coord(1, 0, 0), "default")  # stages differ
    assert seed_for(1, c, "tensor_parallel") != seed_for(1, Coord(0, 0, 1), "tensor_parallel")
    assert seed_for(1, c, "tensor_parallel") == seed_for(1, Coord(0, 5, 0), "tensor_parallel")
    assert seed_for(1, c, "default") != seed_for(2, c, "default")
    assert seed_for(1, c, "default") != seed_for(1, c, "tensor_parallel")


def test_fork_leaves_the_default_stream_untouched_and_replays_from_state() -> None:
    tracker = RngTracker(42, Coord(0, 0, 0))
    plain = torch.rand(4)
    tracker.seed_default()
    first = torch.rand(2)
    with tracker.fork():
        tp_draw = torch.rand(4)
    second = torch.rand(2)
    torch.testing.assert_close(torch.cat([first, second]), plain)  # the fork did not consume default numbers
    assert not torch.equal(tp_draw, plain)

    saved = tracker.state_dict()
    with tracker.fork():
        expected_tp = torch.rand(3)
    expected_default = torch.rand(3)
    tracker.load_state_dict(saved)
    with tracker.fork():
        torch.testing.assert_close(torch.rand(3), expected_tp)
    torch.testing.assert_close(torch.rand(3), expected_default)

    again = RngTracker(42, Coord(0, 0, 0))  # a fresh tracker from the same seed replays everything
    torch.testing.assert_close(torch.rand(4), plain)
    with again.fork():
        torch.testing.assert_close(torch.rand(4), tp_draw)


def _draws(seed: int) -> dict[str, torch.Tensor]:
    topo = Topology(TopologyConfig(model_parallel_size=2, data_parallel_size=2))
    tracker = RngTracker(seed, topo.coord, topo.device)
    default = torch.rand(8)
    with tracker.fork():
        dropout_mask = torch.nn.functional.dropout(torch.ones(8), p=0.5, training=True)
    others = [torch.empty(8) for _ in range(dist.get_world_size())]
    dist.all_gather(others, dropout_mask)
    return {"default": default, "tp": dropout_mask, "all_tp": torch.stack(others)}


def test_streams_across_tensor_parallel_ranks() -> None:
    results = run_distributed(_draws, 4, 7)
    # ranks 0,1 are one tp group, 2,3 the other (tp fastest); dp replicas 0 and 2 share streams.
    torch.testing.assert_close(results[0]["default"], results[1]["default"])
    torch.testing.assert_close(results[0]["default"], results[2]["default"])
    assert not torch.equal(results[0]["tp"], results[1]["tp"])
    torch.testing.assert_close(results[0]["tp"], results[2]["tp"])
    again = run_distributed(_draws, 4, 7)
    for first, second in zip(results, again, strict=True):
        torch.testing.assert_close(first["tp"], second["tp"])
        torch.testing.assert_close(first["default"], second["default"])
