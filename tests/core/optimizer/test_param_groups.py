"""Parameter groups: first matching group wins, biases and norms get no weight decay, frozen stay out."""

from __future__ import annotations

import torch
from torch import nn

from scaling.core.optimizer.config import OptimizerConfig, TrainingGroupConfig
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.optimizer.param_groups import assign_groups, pattern_match_counts
from scaling.core.pipeline.layer_spec import LayerSpec
from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig

NAMES = ["layers.0.weight", "layers.1.norm.weight", "layers.1.up.weight", "layers.1.up.bias", "layers.2.weight"]


def test_first_matching_group_wins_and_decay_is_split() -> None:
    groups = [
        TrainingGroupConfig(name="head", parameters=["layers.2.*"], weight_decay=0.5),
        TrainingGroupConfig(name="rest", parameters=["*"], weight_decay=0.1),
    ]
    slots = assign_groups(NAMES, groups)
    assert [(s.key, s.weight_decay, s.names) for s in slots] == [
        ("head/decay", 0.5, ("layers.2.weight",)),
        ("rest/decay", 0.1, ("layers.0.weight", "layers.1.up.weight")),
        ("rest/no_decay", 0.0, ("layers.1.norm.weight", "layers.1.up.bias")),
    ]
    assert pattern_match_counts(NAMES, groups) == [1, 5]


def test_zero_weight_decay_group_has_one_slot() -> None:
    slots = assign_groups(NAMES, [TrainingGroupConfig()])
    assert [(s.key, len(s.names)) for s in slots] == [("default/no_decay", 5)]


def _frozen_stay_out() -> list[str]:
    topo = Topology(TopologyConfig())

    def loss(y: torch.Tensor, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return y.pow(2).mean(), {}

    module = ParallelModule([LayerSpec(nn.Linear, (3, 3)), LayerSpec(nn.Linear, (3, 3))], topo, loss)
    module.layers["0"].weight.requires_grad_(False)
    optimizer = Optimizer.for_module(module, OptimizerConfig.from_dict({"training_groups": [{"weight_decay": 0.1}]}))
    frozen_before = module.layers["0"].weight.detach().clone()
    module.train_step([torch.randn(2, 3)])
    optimizer.step(0)
    assert torch.equal(module.layers["0"].weight, frozen_before)
    return [name for slot in optimizer.slots for name in slot.names]


def test_frozen_parameters_never_enter_the_optimizer() -> None:
    names = run_distributed(_frozen_stay_out, 1)[0]
    assert sorted(names) == ["layers.0.bias", "layers.1.bias", "layers.1.weight"]
