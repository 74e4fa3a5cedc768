"""Large models: layers built on the meta device, sharded, then materialised one layer at a time.

``ParallelModule(..., meta_init=True)`` under ZeRO 1-3 must give exactly the initial weights of an
ordinary build (so of any layout: one process, tp, pp with a tied embedding and head), train like it,
and never hold the whole model on one rank while it is being built.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.layer_spec import LayerSpec
from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.core.zero import ShardingPolicy, gathered
from scaling.core.zero.memory import measure_peak

from ..pipeline.tp_models import Loss, batches, model_specs


def _build_and_train(layout: dict[str, Any]) -> dict[bool, dict[str, Any]]:
    """An ordinary build and a meta-device build in the same world, each trained for 3 steps."""
    topo = Topology(TopologyConfig(**layout, gradient_accumulation_steps=2))
    return {meta_init: _train(topo, meta_init) for meta_init in (False, True)}


def _train(topo: Topology, meta_init: bool) -> dict[str, Any]:
    config = OptimizerConfig(zero_stage=3)
    module = ParallelModule(
        model_specs(topo, 2, 0.1), topo, Loss(topo), seed=5, sharding=config.sharding, meta_init=meta_init
    )
    initial = {n: gathered(p.detach()).clone() for n, p in module.named_parameters_canonical()}
    optimizer = Optimizer.for_module(module, config)
    dp = topo.dp_size
    losses = []
    for step in range(3):
        mine = batches(2 * dp, seed=10 + step)[topo.dp_rank * 2 : (topo.dp_rank + 1) * 2]
        losses.append(module.train_step(mine, step=step).loss)
        optimizer.step(step)
    return {"initial": initial, "losses": torch.stack(losses)}


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "layout",
    [
        {"data_parallel_size": 2},
        {"model_parallel_size": 2, "data_parallel_size": 2},
        {"pipe_parallel_size": 2, "data_parallel_size": 2},
    ],
    ids=str,
)
def test_meta_init_gives_the_weights_and_training_of_an_ordinary_build(layout: dict[str, Any]) -> None:
    world = 1
    for key in ("model_parallel_size", "pipe_parallel_size", "data_parallel_size"):
        world *= layout.get(key, 1)
    for result in run_distributed(_build_and_train, world, layout, timeout_s=200):
        a, b = result[False], result[True]
        assert a["initial"].keys() == b["initial"].keys()
        for name, weight in a["initial"].items():
            assert torch.equal(weight, b["initial"][name]), name
        assert torch.equal(a["losses"], b["losses"])


LAYERS, HIDDEN = 8, 256  # 8 layers of 65.8k parameters: 2.1 MB of fp32 weights in all


def _construction_peak(meta_init: bool) -> int:
    topo = Topology(TopologyConfig(data_parallel_size=2))
    specs = [LayerSpec(nn.Linear, (HIDDEN, HIDDEN)) for _ in range(LAYERS)]

    def build() -> ParallelModule:
        return ParallelModule(specs, topo, lambda y, b: (y.sum(), {}), sharding=ShardingPolicy(3), meta_init=meta_init)

    return measure_peak(build, device="cpu").peak_bytes  # the meta device holds no bytes


@pytest.mark.timeout(120)
def test_meta_init_never_holds_the_whole_model() -> None:
    layer_bytes = (HIDDEN * HIDDEN + HIDDEN) * 4
    eager = run_distributed(_construction_peak, 2, False, timeout_s=100)
    meta = run_distributed(_construction_peak, 2, True, timeout_s=100)
    for built_whole, built_by_layer in zip(eager, meta, strict=True):
        assert built_whole >= LAYERS * layer_bytes  # the ordinary build holds every layer whole first
        # Shards (half the model at dp=2) plus one layer being materialised, plus small change.
        assert built_by_layer <= LAYERS * layer_bytes / 2 + 2 * layer_bytes, (built_by_layer, layer_bytes)
