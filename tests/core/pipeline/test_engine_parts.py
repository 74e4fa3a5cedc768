"""Pieces of the engine on their own: bucketed gradient reduction and RNG replay under checkpointing."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from scaling.core.pipeline.checkpointing import checkpointed
from scaling.core.pipeline.grad_reduce import GradReducer
from scaling.core.testing import run_distributed
from scaling.core.topology import Coord, RngTracker
from scaling.core.zero.grad_sync import BucketedAllReduce, ModelParallelSums


def _reduce_in_buckets() -> dict[str, object]:
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    reducer = GradReducer(list(model.named_parameters()), None, dist.get_world_size(), bucket_bytes=64)
    launched_during_backward = []
    reducer.zero(n_micro=2)
    for micro in range(2):
        x = torch.full((3, 4), float(rank + micro))
        model(x).pow(2).sum().backward()
        launched_during_backward.append(reducer._next_launch)
    reducer.finish()
    views_kept = all(
        p.grad is not None and p.grad.data_ptr() == view.data_ptr()
        for bucket in reducer.buckets
        for p, view in zip(bucket.params, bucket.views, strict=True)
    )
    return {
        "grads": [p.grad.clone() for p in model.parameters()],
        "launched": launched_during_backward,
        "buckets": len(reducer.buckets),
        "views_kept": views_kept,
    }


def test_buckets_reduce_during_the_last_backward_and_average() -> None:
    results = run_distributed(_reduce_in_buckets, 2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    for rank in range(2):
        for micro in range(2):
            (model(torch.full((3, 4), float(rank + micro))).pow(2).sum() / 2).backward()
    for result in results:
        assert result["buckets"] > 2  # small buckets: several collectives
        assert result["views_kept"]
        # Nothing launches during the first backward; every bucket has launched by the end of the last one,
        # before finish() is called: communication overlapped the backward pass.
        assert result["launched"] == [0, result["buckets"]]
        for got, p in zip(result["grads"], model.parameters(), strict=True):
            torch.testing.assert_close(got, p.grad)


class _RandomLayer(nn.Module):
    """Draws from both the tensor-parallel stream and torch's global generator."""

    def __init__(self, tracker: RngTracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.linear = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.tracker.fork():
            x = nn.functional.dropout(self.linear(x), p=0.5, training=True)
        return nn.functional.dropout(torch.tanh(x), p=0.3, training=True)


def test_checkpointing_replays_both_rng_streams() -> None:
    grads = []
    for use_checkpoint in (False, True):
        tracker = RngTracker(5, Coord(0, 0, 0))
        torch.manual_seed(1)
        layer = _RandomLayer(tracker)
        tracker.seed_default()
        x = torch.randn(4, 6, requires_grad=True)
        out = checkpointed(layer, x, rng_tracker=tracker) if use_checkpoint else layer(x)
        out.sum().backward()
        grads.append((x.grad.clone(), layer.linear.weight.grad.clone(), out.detach()))
    for plain, recomputed in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(recomputed, plain, rtol=0, atol=0)


def _frozen_parameters_are_left_alone() -> dict[str, object]:
    from scaling.core.pipeline.layer_spec import LayerSpec
    from scaling.core.pipeline.module import ParallelModule
    from scaling.core.topology import Topology, TopologyConfig

    topo = Topology(TopologyConfig(data_parallel_size=2))

    def loss(y: torch.Tensor, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return y.pow(2).mean(), {}

    module = ParallelModule([LayerSpec(nn.Linear, (4, 4)), LayerSpec(nn.Linear, (4, 4))], topo, loss)
    frozen = module.layers["0"].weight
    frozen.requires_grad_(False)
    reducer = GradReducer(module.named_parameters_canonical(), topo.dp_group, topo.dp_size, bucket_bytes=1 << 20)
    module.grad_sync = BucketedAllReduce(reducer, {}, ModelParallelSums(topo.tp_group))
    module.param_table = module._build_param_table()  # the table records what was frozen after building
    module.train_step([torch.randn(2, 4) + dist.get_rank()])
    in_buckets = any(p is frozen for b in reducer.buckets for p in b.params)
    counted = "layers.0.weight" in module.names_counted_in_norm()
    return {"grad_is_none": frozen.grad is None, "in_buckets": in_buckets, "counted": counted}


def test_frozen_parameters_get_no_gradient_bucket_or_norm_share() -> None:
    for result in run_distributed(_frozen_parameters_are_left_alone, 2):
        assert result == {"grad_is_none": True, "in_buckets": False, "counted": False}
