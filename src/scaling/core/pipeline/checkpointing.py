"""Activation checkpointing: keep a block's inputs, recompute its activations in the backward pass.

Built on non-reentrant ``torch.utils.checkpoint``, which restores torch's global RNG for the recompute.
The tensor-parallel RNG stream lives outside torch's generator, so it is rewound here as well. Dropout
drawn by :class:`scaling.core.nn.dropout.LayoutInvariantDropout` needs neither: its masks are keyed by
what is being computed, and the key is set inside the checkpointed function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from torch.utils.checkpoint import checkpoint

from scaling.core.topology.rng import RngTracker

__all__ = ["checkpointed"]


def checkpointed(fn: Callable[..., Any], *args: Any, rng_tracker: RngTracker | None = None) -> Any:
    """``fn(*args)``, storing only ``args`` for the backward pass and recomputing the rest."""
    if rng_tracker is None:
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)
    tracker = rng_tracker

    def contexts() -> tuple[contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]]:
        state_at_forward = tracker.tp_state
        return contextlib.nullcontext(), tracker.replay(state_at_forward)

    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, context_fn=contexts)
