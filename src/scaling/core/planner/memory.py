"""Per-rank memory of a layout: the ZeRO estimate of parameters, gradients and optimizer state
(:func:`scaling.core.zero.memory.estimate_memory`) plus the activations the pipeline schedule keeps alive.

Activations are given per micro-batch for each layer of this rank's stage (the model knows its own
tensors: :mod:`scaling.transformer.planning.activations`); how many micro-batches are alive at once is
counted from the schedule's own instruction lists (:func:`scaling.core.pipeline.simulate.simulate`'s
``peak_in_flight``: 1F1B keeps ``pp - stage`` on stage ``stage``, GPipe all of them). Activation
checkpointing keeps only each checkpointed block's input per micro-batch in flight, and in the backward
pass recomputes one block (every layer) or the whole stage (every pipe stage) for one micro-batch at a
time. The worst moment is the first backward: every in-flight micro-batch's saved tensors, one block's
recomputed tensors, and the loss's gradient over the logits (``backward_transient``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch

from scaling.core.pipeline.schedule import build_schedule
from scaling.core.pipeline.simulate import simulate
from scaling.core.zero.memory import MemoryEstimate, ParamSize, estimate_memory

__all__ = ["RankMemory", "StageActivations", "activation_peak", "in_flight_micro_batches", "rank_memory"]


@dataclass(frozen=True)
class StageActivations:
    """One micro-batch's activation bytes on this rank, per layer of its stage (in order).

    ``saved``: what each layer keeps for its backward; ``inputs``: each layer's input (what checkpointing
    keeps instead); ``boundary``: the received input and sent output of the stage, kept per in-flight
    micro-batch when ``pp > 1``; ``sent``: what the stage sends per micro-batch (activations forward,
    gradients backward), which stays referenced by its non-blocking send until the step's end;
    ``backward_transient``: the largest extra tensor of one backward (the gradient of the logits on the
    last stage)."""

    saved: tuple[int, ...]
    inputs: tuple[int, ...]
    boundary: int = 0
    sent: int = 0
    backward_transient: int = 0


@cache
def in_flight_micro_batches(schedule: str, n_micro: int, pp: int, n_chunks: int = 1) -> tuple[int, ...]:
    """Per pipeline stage, the most micro-batch chunks whose activations are alive at once, from the
    schedule's instruction lists (simulated, so every schedule in :mod:`~scaling.core.pipeline.schedule`
    is counted the same way)."""
    kind = schedule if n_chunks > 1 else ("1f1b" if schedule == "interleaved_1f1b" else schedule)
    schedules = [build_schedule(kind, n_micro, pp, stage, n_chunks) for stage in range(pp)]
    return tuple(simulate(schedules, n_micro, n_chunks).peak_in_flight)


def activation_peak(activations: StageActivations, in_flight: int, checkpointing: str, n_chunks: int = 1) -> int:
    """Activation bytes one rank keeps at the start of a backward: ``in_flight`` micro-batch chunks alive
    (each ``1 / n_chunks`` of the stage's layers) and the recomputed block of the one going backward. The
    loss's transient (``backward_transient``) is added by :func:`rank_memory`."""
    saved, inputs = sum(activations.saved), sum(activations.inputs)
    kept_per_micro = {
        "disabled": saved,
        "every_layer": inputs,
        "every_pipe_stage": activations.inputs[0] if activations.inputs else 0,
    }[checkpointing]
    recomputed = {
        "disabled": 0,
        "every_layer": max(activations.saved, default=0),
        "every_pipe_stage": saved // n_chunks,
    }[checkpointing]
    per_chunk = kept_per_micro // n_chunks + activations.boundary
    return in_flight * per_chunk + recomputed


@dataclass(frozen=True)
class RankMemory:
    """Bytes of one rank: the ZeRO terms, the activations at the peak, and the total peak."""

    states: MemoryEstimate
    activations: int
    in_flight: int
    peak: int

    @property
    def parameters(self) -> int:
        return self.states.parameters

    @property
    def gradients(self) -> int:
        return self.states.gradients

    @property
    def optimizer(self) -> int:
        return self.states.optimizer


def rank_memory(
    params: Sequence[ParamSize],
    activations: StageActivations,
    *,
    zero_stage: int,
    dp: int,
    n_micro: int,
    pp: int,
    stage: int,
    schedule: str = "1f1b",
    n_chunks: int = 1,
    checkpointing: str = "disabled",
    compute_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype | None = torch.float32,
    offload: bool = False,
) -> RankMemory:
    """The peak of one rank on a layout: its stage's parameter sizes (tensor-parallel local) and one
    micro-batch's activations, the ZeRO stage, the schedule and activation checkpointing."""
    in_flight = in_flight_micro_batches(schedule, n_micro, pp, n_chunks)[stage]
    kept = activation_peak(activations, in_flight, checkpointing, n_chunks) + n_micro * n_chunks * activations.sent
    states = estimate_memory(
        params,
        zero_stage=zero_stage,
        dp=dp,
        compute_dtype=compute_dtype,
        reduce_dtype=reduce_dtype,
        gradient_accumulation_steps=n_micro,
        offload=offload,
    )
    # The loss's gradient over the logits is gone before the first unit's gradient is reduced, and that
    # unit's own activations are freed by its backward before its reduction starts: the larger of the two
    # moments counts, on top of what the step holds and the activations kept.
    freed = activations.saved[-1] if activations.saved and in_flight else 0
    transient = max(activations.backward_transient, states.transient - freed)
    return RankMemory(states, kept, in_flight, states.steady_peak + kept + transient)
