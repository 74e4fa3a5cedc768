"""Vocabulary-parallel embedding: rows of the table split over tp ranks.

Rank i holds rows ``[i * V / tp, (i + 1) * V / tp)``. Each rank looks up the tokens it owns, writes zeros
for the rest, and the all-reduce (or, under sequence parallelism, reduce-scatter) assembles the full
embeddings: exactly one rank contributes each token's row.
"""

from __future__ import annotations

import torch
from torch import nn

from scaling.core.nn.comm import reduce_from_tp, reduce_scatter_to_sp
from scaling.core.nn.param_meta import InitMethod, ParamMeta, init_normal, local_slice_of_init, set_param_meta
from scaling.core.topology.topology import Topology

__all__ = ["VocabParallelEmbedding"]


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        topology: Topology,
        *,
        init_method: InitMethod | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        tp, rank = topology.tp_size, topology.tp_rank
        if num_embeddings % tp != 0:
            raise ValueError(
                f"vocabulary size ({num_embeddings}) must be divisible by the tensor-parallel size ({tp}); "
                "pad the vocabulary"
            )
        self.topology = topology
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_local = num_embeddings // tp
        self.vocab_start = rank * self.vocab_local
        self.sequence_parallel = topology.config.sequence_parallel and tp > 1
        init = init_method or init_normal()
        weight = local_slice_of_init((num_embeddings, embedding_dim), init, seed, 0, rank, tp, dtype, topology.device)
        self.weight = nn.Parameter(weight)
        set_param_meta(self.weight, ParamMeta(tp_split_dim=0))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> embeddings [b, s, h] (or [b, s / tp, h] under sequence parallelism)."""
        if self.topology.tp_size == 1:
            return nn.functional.embedding(tokens, self.weight)
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_local)
        embedded = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        embedded = embedded.masked_fill(outside.unsqueeze(-1), 0.0)
        group = self.topology.tp_group
        return reduce_scatter_to_sp(embedded, group) if self.sequence_parallel else reduce_from_tp(embedded, group)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings} (local rows {self.vocab_start}..{self.vocab_start + self.vocab_local - 1}), "
            f"{self.embedding_dim}, tp_rank={self.topology.tp_rank}/{self.topology.tp_size}"
        )
