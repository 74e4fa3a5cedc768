"""Per-layer gradient norms around a bad step: which layer blew up, not only that the model did.

A spike or a NaN says the global gradient norm went wrong; debugging it needs the layer it came from and
whether that layer was already drifting before. So every step the loop keeps the gradient norm of each
pipeline layer with weights of its own (``layers.<index>.<class>``; a tied copy counts at its first layer)
of the last ``layer_norm_steps`` steps in a small ring; an event writes the ring (the steps before it and
the event's own step) into its ledger entry, and the event's step and the ``layer_norm_steps`` executed
steps after it carry the per-layer norms in their metrics record (``layer_grad_norm/<layer>``).

The norms come from the optimizer's step, which reduces the squared norm of every layer in the same
all-reduce as the global norm (the same gradients, unscaled and before clipping, counted the same way:
each weight once over tensor-parallel ranks, pipeline stages and, for ZeRO shards, data-parallel ranks).
They stay on the device and are read to the host only for an event or a record that carries them.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

from scaling.core.optimizer.optimizer import Optimizer, OptimizerStepResult
from scaling.core.pipeline.module import ParallelModule

__all__ = ["LayerNormRing", "layer_names"]


def layer_names(module: ParallelModule) -> list[str]:
    """The name of every pipeline layer of the whole model (every stage's), in order."""
    width = len(str(max(len(module.specs) - 1, 0)))
    return [f"layers.{i:0{width}d}.{spec.name}" for i, spec in enumerate(module.specs)]


class LayerNormRing:
    """The per-layer norms of the last ``steps`` steps, and how many steps still log them after an event."""

    def __init__(self, module: ParallelModule, optimizer: Optimizer, steps: int) -> None:
        """Collective (when ``steps`` > 0): which layers own trainable weights is summed over the norm's group."""
        self.module, self.optimizer, self.steps = module, optimizer, steps
        counted = set(module.names_counted_in_norm())
        layers = [r.layer for r in module.param_table.values() if r.name in counted and r.trainable]
        self._kept: list[int] = []  # layers with weights of their own (a tied head's weight counts at the embedding)
        if self.enabled:
            owned = torch.zeros(len(module.specs), dtype=torch.float32, device=module.topology.device)
            for layer in layers:
                owned[layer] += 1
            self._all_reduce(owned)
            self._kept = [i for i, n in enumerate(owned.tolist()) if n > 0]
        every = layer_names(module)
        self.names = [every[i] for i in self._kept]
        self._ring: deque[tuple[int, torch.Tensor]] = deque(maxlen=steps + 1)  # (step, norms) incl. the newest
        self._after = 0  # executed steps left that log their norms (set by an event)

    @property
    def enabled(self) -> bool:
        return self.steps > 0

    def measure(self, step: int, update: OptimizerStepResult) -> None:
        """Keep the per-layer norms of the step that completed as ``step`` (1-based): the optimizer's step
        reduced them with the global norm (unscaled, before clipping), so nothing is computed here."""
        if self.enabled and update.layer_grad_squares is not None:
            self._ring.append((step, update.layer_grad_squares[self._kept].sqrt()))

    def _all_reduce(self, values: torch.Tensor) -> None:
        """Sum over the ranks whose gradients make up the model's norm (every rank when weights are sharded)."""
        group = dist.group.WORLD if self.optimizer.sharded else self.module.topology.model_group
        if dist.is_initialized() and group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(values, group=group)

    def event(self) -> dict[str, dict[str, float]]:
        """An event at the newest step: the ring for its ledger entry ({step: {layer: norm}}); the next
        ``steps`` executed steps log their norms."""
        self._after = self.steps
        return {str(step): self._named(norms) for step, norms in self._ring}

    def for_record(self, is_event: bool) -> dict[str, float]:
        """The newest step's norms as metrics (``layer_grad_norm/<layer>``) when it is an event's step or
        one of the steps after one; otherwise nothing. Counts the steps after an event down."""
        if not self._ring:
            return {}
        if not is_event:
            if self._after <= 0:
                return {}
            self._after -= 1
        return {f"layer_grad_norm/{k}": v for k, v in self._named(self._ring[-1][1]).items()}

    @property
    def logging(self) -> bool:
        """Whether the newest step's record must be written (it carries norms after an event)."""
        return self._after > 0

    def _named(self, norms: torch.Tensor) -> dict[str, float]:
        return {name: float(v) for name, v in zip(self.names, norms.tolist(), strict=True)}
