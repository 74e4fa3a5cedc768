"""A tiny tensor-parallel language model for engine tests: vocab-parallel embedding tied to the LM head,
pre-norm MLP blocks of column/row-parallel layers with dropout, vocab-parallel loss. Works under sequence
parallelism. Activations are the pytree {"h": [b, s(/tp), h], "positions": [b, s]}."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scaling.core.nn import (
    ColumnParallelLinear,
    LayoutInvariantDropout,
    ParamMeta,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
    all_gather_from_sp,
    copy_to_tp,
    set_param_meta,
    vocab_parallel_cross_entropy,
)
from scaling.core.nn.param_meta import init_normal, local_slice_of_init
from scaling.core.pipeline.layer_spec import LayerSpec, TiedLayerSpec
from scaling.core.topology import Topology

VOCAB, HIDDEN, SEQ, MICRO = 16, 8, 4, 2


def _seq_dropout(p: float, topology: Topology) -> LayoutInvariantDropout:
    if topology.config.sequence_parallel and topology.tp_size > 1:
        return LayoutInvariantDropout(p, split_dim=1, split_parts=topology.tp_size, split_index=topology.tp_rank)
    return LayoutInvariantDropout(p)


class Embedding(VocabParallelEmbedding):
    def __init__(self, topology: Topology, dropout: float) -> None:
        super().__init__(VOCAB, HIDDEN, topology, seed=1, init_method=init_normal(0.5))
        self.dropout = _seq_dropout(dropout, topology)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        tokens = batch["tokens"]
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        return {"h": self.dropout(super().forward(tokens)), "positions": positions}


class Block(nn.Module):
    def __init__(self, topology: Topology, seed: int, dropout: float) -> None:
        super().__init__()
        self.norm = RMSNorm(HIDDEN, topology)
        with torch.no_grad():  # a non-trivial norm weight, the same on every layout
            self.norm.weight.copy_(1 + 0.1 * torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed)))
        self.up = ColumnParallelLinear(HIDDEN, 2 * HIDDEN, topology, seed=seed, init_method=init_normal(0.3))
        self.down = RowParallelLinear(2 * HIDDEN, HIDDEN, topology, seed=seed + 2, init_method=init_normal(0.3))
        self.dropout = _seq_dropout(dropout, topology)

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = x["h"]
        h = h + self.dropout(self.down(nn.functional.gelu(self.up(self.norm(h)))))
        return {"h": h, "positions": x["positions"]}


class Head(nn.Module):
    """logits_local = h E_local^T, E the embedding table split by vocabulary rows (tied)."""

    def __init__(self, topology: Topology) -> None:
        super().__init__()
        self.topology = topology
        tp, rank = topology.tp_size, topology.tp_rank
        weight = local_slice_of_init((VOCAB, HIDDEN), init_normal(0.5), 1, 0, rank, tp)
        self.weight = nn.Parameter(weight)
        set_param_meta(self.weight, ParamMeta(tp_split_dim=0))
        self.sequence_parallel = topology.config.sequence_parallel and tp > 1

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        group = self.topology.tp_group
        h = all_gather_from_sp(x["h"], group) if self.sequence_parallel else copy_to_tp(x["h"], group)
        return h @ self.weight.t()  # [b, s, vocab / tp]


class Loss:
    def __init__(self, topology: Topology) -> None:
        self.group = topology.tp_group

    def __call__(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        per_token = vocab_parallel_cross_entropy(logits, batch["targets"], self.group)
        mask = batch["targets"] != -100
        loss = per_token.sum() / mask.sum()
        return loss, {"tokens": mask.sum().float()}


def model_specs(topology: Topology, n_blocks: int, dropout: float) -> list[LayerSpec]:
    return [
        TiedLayerSpec(Embedding, (topology, dropout), key="embedding"),
        *[LayerSpec(Block, (topology, 100 + 10 * i, dropout)) for i in range(n_blocks)],
        TiedLayerSpec(Head, (topology,), key="embedding"),
    ]


def batches(n: int, seed: int = 7) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        targets = torch.randint(0, VOCAB, (MICRO, SEQ), generator=g)
        targets[0, -1] = -100  # an ignored position in every micro-batch
        out.append({"tokens": torch.randint(0, VOCAB, (MICRO, SEQ), generator=g), "targets": targets})
    return out


class SampleWindows:
    """64 single samples cut from ``batches(64, seed=9)``: a map-style dataset for trainer tests."""

    def __init__(self) -> None:
        self.samples = [{k: v[0] for k, v in b.items()} for b in batches(64, seed=9)]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.samples[index]

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([i[k] for i in items]) for k in items[0]}
