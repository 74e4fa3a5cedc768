"""Random-number streams for tensor-parallel code.

Two streams per rank:

* the *default* stream (torch's global generator) is seeded identically on all tp ranks of a model
  replica, so anything computed redundantly on every tp rank (dropout on replicated activations) draws
  the same numbers there;
* the *tensor-parallel* stream differs per tp rank, for randomness on a tp shard (dropout inside a
  column-parallel region), and is entered with ``with tracker.fork():``.

Seeds are a pure function of the one config seed and the rank's coordinates, so a run is reproducible
and the streams can be saved in and restored from checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Literal

import torch

from scaling.core.topology.rank_math import Coord

__all__ = ["RngTracker", "seed_for"]

Region = Literal["default", "tensor_parallel"]

_MAX_SEED = 2**63 - 1


def seed_for(base_seed: int, coord: Coord, region: Region) -> int:
    """The seed of ``region`` on the rank at ``coord``.

    ``default`` depends on the pipeline stage only (stages hold different layers, so their streams must
    not be copies); ``tensor_parallel`` also on the tp rank. Data-parallel replicas share streams: their
    difference comes from the data they see.
    """
    key = f"{base_seed}/{region}/pp{coord.pp}"
    if region == "tensor_parallel":
        key += f"/tp{coord.tp}"
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") % _MAX_SEED


class RngTracker:
    """Owns the default and tensor-parallel generator states of one rank on one device type."""

    def __init__(self, base_seed: int, coord: Coord, device: torch.device | str = "cpu") -> None:
        self.base_seed = base_seed
        self.coord = coord
        self.device = torch.device(device)
        self._tp_state = self._fresh_state(seed_for(base_seed, coord, "tensor_parallel"))
        self.seed_default()

    def seed_default(self) -> None:
        """(Re)seed torch's global generators with this rank's default-region seed."""
        seed = seed_for(self.base_seed, self.coord, "default")
        torch.manual_seed(seed)  # also seeds every CUDA device

    def _get_state(self) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def _set_state(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    def _fresh_state(self, seed: int) -> torch.Tensor:
        outer = self._get_state()
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        state = self._get_state()
        self._set_state(outer)
        return state

    @contextlib.contextmanager
    def fork(self) -> Iterator[None]:
        """Draw from the tensor-parallel stream inside the block; the default stream is left untouched."""
        outer = self._get_state()
        self._set_state(self._tp_state)
        try:
            yield
        finally:
            self._tp_state = self._get_state()
            self._set_state(outer)

    @property
    def tp_state(self) -> torch.Tensor:
        """The tensor-parallel stream's state right now (what a recomputation must start from)."""
        return self._tp_state.clone()

    @contextlib.contextmanager
    def replay(self, tp_state: torch.Tensor) -> Iterator[None]:
        """Run the block with the tensor-parallel stream rewound to ``tp_state``, then restore it.

        Activation checkpointing uses this so a recomputed forward draws the numbers the first one drew.
        """
        current = self._tp_state
        self._tp_state = tp_state.clone()
        try:
            yield
        finally:
            self._tp_state = current

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Both streams, for checkpoints (uint8 tensors, safe to store as safetensors)."""
        return {"default": self._get_state().clone(), "tensor_parallel": self._tp_state.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = {"default", "tensor_parallel"} - state.keys()
        if missing:
            raise KeyError(f"RNG state is missing {sorted(missing)}")
        self._set_state(state["default"])
        self._tp_state = state["tensor_parallel"].clone()
