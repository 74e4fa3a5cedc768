"""Dropout whose masks do not depend on the parallel layout.

A dropout mask drawn from a running RNG stream depends on how many numbers were drawn before it, which
changes with the pipeline split, the data-parallel split and activation recomputation. Here each mask is
a pure function of *what* is being dropped: (seed, step, global micro-batch, layer index, call number
within the layer). The engine sets that key around every layer it runs (:func:`dropout_key`), so

* any (tp, pp, dp) layout draws exactly the masks a single process draws for the same samples;
* recomputation under activation checkpointing redraws the same masks without saving RNG state.

Activations split over tensor-parallel ranks (along ``split_dim``) take their slice of the full mask.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["DropoutKey", "LayoutInvariantDropout", "current_dropout_key", "dropout_key"]


@dataclass(frozen=True, slots=True)
class DropoutKey:
    seed: int
    step: int
    micro_batch: int  # global index of the micro-batch within the step (over all data-parallel ranks)
    layer: int  # global index of the layer in the model


class _State(threading.local):
    key: DropoutKey | None = None
    calls: int = 0


_state = _State()


@contextlib.contextmanager
def dropout_key(key: DropoutKey) -> Iterator[None]:
    """Within the block, dropout draws masks keyed by ``key`` (call numbers restart at 0)."""
    previous = (_state.key, _state.calls)
    _state.key, _state.calls = key, 0
    try:
        yield
    finally:
        _state.key, _state.calls = previous


def current_dropout_key() -> DropoutKey | None:
    return _state.key


def _mask_seed(key: DropoutKey, call: int) -> int:
    text = f"{key.seed}/{key.step}/{key.micro_batch}/{key.layer}/{call}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


class LayoutInvariantDropout(nn.Module):
    """Inverted dropout with layout-independent masks.

    Args:
        p: probability of zeroing an element.
        split_dim: dimension along which the input is split over ``split_parts`` ranks (None: not split).
        split_parts / split_index: how many parts and which one this rank holds.

    Outside any :func:`dropout_key` block (e.g. plain single-device use) it falls back to
    ``torch.nn.functional.dropout`` on torch's global generator.
    """

    def __init__(self, p: float, split_dim: int | None = None, split_parts: int = 1, split_index: int = 0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.split_dim = split_dim
        self.split_parts = split_parts
        self.split_index = split_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        key = _state.key
        if key is None:
            return nn.functional.dropout(x, self.p, training=True)
        call = _state.calls
        _state.calls += 1
        shape = list(x.shape)
        if self.split_dim is not None:
            shape[self.split_dim] *= self.split_parts
        generator = torch.Generator(device=x.device).manual_seed(_mask_seed(key, call))
        keep = torch.rand(shape, generator=generator, device=x.device) >= self.p
        if self.split_dim is not None:
            size = x.shape[self.split_dim]
            keep = keep.narrow(self.split_dim, self.split_index * size, size)
        return x * keep.to(x.dtype) / (1.0 - self.p)

    def extra_repr(self) -> str:
        split = (
            "" if self.split_dim is None else f", split_dim={self.split_dim} ({self.split_index}/{self.split_parts})"
        )
        return f"p={self.p}{split}"
