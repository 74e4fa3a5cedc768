"""Tiny layers for engine tests: deterministic init from a seed, pytree activations, tied embedding/head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scaling.core.nn.dropout import LayoutInvariantDropout


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Embed(nn.Module):
    """tokens [b, s] -> {"h": [b, s, hidden], "keep": [b, s]} (a pytree with a non-float leaf)."""

    def __init__(self, vocab: int, hidden: int, seed: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, hidden, generator=_generator(seed)) * 0.5)
        self.dropout = LayoutInvariantDropout(dropout)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens = batch["tokens"]
        return {"h": self.dropout(self.weight[tokens]), "keep": tokens >= 0}


class Block(nn.Module):
    """h + dropout(tanh(h W + b)), masked by "keep"."""

    def __init__(self, hidden: int, seed: int, dropout: float = 0.0) -> None:
        super().__init__()
        g = _generator(seed)
        self.linear = nn.Linear(hidden, hidden)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(hidden, hidden, generator=g) / hidden**0.5)
            self.linear.bias.copy_(torch.randn(hidden, generator=g) * 0.1)
        self.dropout = LayoutInvariantDropout(dropout)

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = x["h"] + self.dropout(torch.tanh(self.linear(x["h"])))
        return {"h": h * x["keep"].unsqueeze(-1), "keep": x["keep"]}


class Head(nn.Module):
    """logits = h E^T with E tied to the embedding."""

    def __init__(self, vocab: int, hidden: int, seed: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, hidden, generator=_generator(seed)) * 0.5)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return x["h"] @ self.weight.t()


def loss_fn(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
    accuracy = (logits.argmax(-1) == batch["targets"]).float().mean()
    return loss, {"accuracy": accuracy}


def make_batches(n: int, micro_batch: int, seq: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = _generator(seed)
    return [
        {
            "tokens": torch.randint(0, vocab, (micro_batch, seq), generator=g),
            "targets": torch.randint(0, vocab, (micro_batch, seq), generator=g),
        }
        for _ in range(n)
    ]


def specs(n_blocks: int, vocab: int, hidden: int, dropout: float) -> list[Any]:
    from scaling.core.pipeline.layer_spec import LayerSpec, TiedLayerSpec

    return [
        TiedLayerSpec(Embed, (vocab, hidden, 1), {"dropout": dropout}, key="embedding"),
        *[LayerSpec(Block, (hidden, 10 + i), {"dropout": dropout}) for i in range(n_blocks)],
        TiedLayerSpec(Head, (vocab, hidden, 1), key="embedding"),
    ]
