"""Seed every random number generator an experiment is likely to draw from, on this rank.

An experiment's seed is recorded with the run, so rerunning it must reproduce it: Python's ``random``,
NumPy's global generator (``np.random.*``) and torch's generators on the CPU and every CUDA device all
start from it. Every rank gets the same seed, so a model built before sharding has the same initial
weights on every process, as a single process would (the layouts-agree invariant in DESIGN.md). Code that
makes its own generator (``np.random.default_rng()``, ``torch.Generator()``) must seed it itself.
"""

from __future__ import annotations

import random

__all__ = ["apply_seed"]


def apply_seed(seed: int) -> None:
    """Seed ``random``, NumPy's global generator and torch (CPU and all CUDA devices) with ``seed``."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ValueError(f"apply_seed: seed must be an integer in [0, 2**32) (NumPy's range), got {seed!r}")
    # numpy and torch load here, not at import: declaring and listing experiments should not pay for them.
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device (lazily, if CUDA is not initialised yet)
