"""The model as layer specs: input projection, residual blocks (column -> relu -> row), classifier head.

Each layer is built on the rank that owns it (pipeline stage), with tensor-parallel column/row layers
inside. Nothing here mentions ranks: the same code runs on any (tp, pp, dp).
"""

from __future__ import annotations

import torch
from torch import nn

from examples.mlp_example.config import MLPModelConfig
from scaling.core.nn import (
    ColumnParallelLinear,
    LayoutInvariantDropout,
    RowParallelLinear,
    gather_from_tp,
    vocab_parallel_cross_entropy,
)
from scaling.core.pipeline.layer_spec import LayerSpec
from scaling.core.topology import Topology

N_FEATURES = 64  # 8x8 pixels


class InputProjection(nn.Module):
    def __init__(self, config: MLPModelConfig, topology: Topology) -> None:
        super().__init__()
        self.proj = ColumnParallelLinear(N_FEATURES, config.hidden_size, topology, gather_output=True, seed=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, 64] -> [b, hidden]
        return torch.relu(self.proj(x))


class Block(nn.Module):
    def __init__(self, config: MLPModelConfig, topology: Topology, seed: int) -> None:
        super().__init__()
        self.up = ColumnParallelLinear(config.hidden_size, config.ffn_size, topology, seed=seed)
        self.down = RowParallelLinear(config.ffn_size, config.hidden_size, topology, seed=seed + 2)
        self.dropout = LayoutInvariantDropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, hidden]; [b, ffn / tp] inside
        return x + self.dropout(self.down(torch.relu(self.up(x))))


class Head(nn.Module):
    def __init__(self, config: MLPModelConfig, topology: Topology) -> None:
        super().__init__()
        self.logits = ColumnParallelLinear(config.hidden_size, config.padded_classes, topology, seed=99)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, hidden] -> [b, classes / tp]
        return self.logits(x)


def layer_specs(config: MLPModelConfig, topology: Topology) -> list[LayerSpec]:
    return [
        LayerSpec(InputProjection, (config, topology)),
        *[LayerSpec(Block, (config, topology, 10 + 10 * i)) for i in range(config.blocks)],
        LayerSpec(Head, (config, topology)),
    ]


class ClassificationLoss:
    """Cross entropy over tp-split logits; accuracy from the gathered logits (a metric, no gradient)."""

    def __init__(self, topology: Topology) -> None:
        self.group = topology.tp_group

    def __call__(
        self, logits: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = vocab_parallel_cross_entropy(logits, batch["y"], self.group).mean()
        with torch.no_grad():
            predicted = gather_from_tp(logits.detach(), self.group).argmax(-1)
        return loss, {"accuracy": (predicted == batch["y"]).float().mean()}


def model_input(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["x"]
