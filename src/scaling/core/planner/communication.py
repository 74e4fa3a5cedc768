"""Bytes each rank puts on the wire per optimizer step, per parallel dimension, and the link each one uses.

Inputs are plain numbers (parameter counts, layer count, activation shape), so ``core`` stays
model-agnostic; the transformer planner computes them. Every figure is bytes **sent** by one rank (for the
ring collectives NCCL and gloo run, a rank receives as much as it sends), so dividing by a link's
per-direction bandwidth gives a time. Collective volumes per rank for a tensor of ``S`` bytes over ``n``
ranks: all-reduce ``2 (n-1)/n S``, reduce-scatter and all-gather ``(n-1)/n S`` each.

* **tp** (Megatron-style layers): two all-reduces of the ``[tokens, hidden]`` activation per layer in the
  forward (after attention and after the MLP) and two in the backward, in the compute dtype. Sequence
  parallelism replaces each all-reduce by an all-gather and a reduce-scatter: the same volume. A
  recomputed layer (activation checkpointing) runs its forward all-reduces once more in the backward.
* **dp**, as :mod:`scaling.core.zero` runs it on FSDP2 (gradients in the reduce dtype, gathered
  parameters in the compute dtype):

  - stage 0: one all-reduce of the trainable gradients per step (the buckets fire in the last backward);
  - stage 1: one reduce-scatter of the gradients per step, and the parameters all-gathered in every
    micro-batch's forward (FSDP2 frees them after each backward, so gradient accumulation re-gathers);
  - stage 2: as 1, but the gradients are reduce-scattered after every micro-batch;
  - stage 3: as 2, and the parameters are gathered again for every backward (they were freed after the
    forward). The last layer of a chunk, which stays gathered, is not singled out: a small overestimate.

  So with one micro-batch, a reduce dtype equal to the compute dtype and every parameter trainable,
  stages 0, 1 and 2 move the same ``2 (d-1)/d`` parameter bytes and stage 3 ``3 (d-1)/d``.
  The all-reduce of tied weights' gradients between the first and last stage is left out (one matrix).
* **pp**: each micro-batch's activation goes forward and its gradient back over every stage boundary,
  once per model chunk; ``pp`` counts what the busiest rank sends. Without sequence parallelism every
  tensor-parallel rank sends the whole ``[tokens, hidden]`` tensor; with it, its ``1/tp`` sequence shard.

Links follow the rank order of DESIGN.md (tp fastest, then dp, then pp): a group whose ranks all sit on
one node of ``gpus_per_node`` uses the intra-node link (NVLink), otherwise the inter-node one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["CommunicationVolume", "Group", "Link", "link_of", "step_communication"]

Group = Literal["tp", "dp", "pp"]
Link = Literal["intra", "inter"]


@dataclass(frozen=True)
class CommunicationVolume:
    """Bytes one rank sends per optimizer step, by parallel dimension."""

    tp: float
    dp_reduce: float  # gradient all-reduce (stage 0) or reduce-scatter (stages 1-3)
    dp_gather: float  # parameter all-gathers (stages 1-3)
    pp: float  # activations forward and gradients back, for the busiest stage
    pp_message: float  # bytes of one activation (or its gradient) crossing one stage boundary
    dp_reduce_calls: int  # gradient reductions per step: 1, or one per micro-batch (stages 2, 3)
    dp_gather_calls: int  # parameter gathers per step: 0, n_micro (stages 1, 2) or 2 n_micro (stage 3)
    links: dict[Group, Link] = field(default_factory=dict)

    @property
    def dp(self) -> float:
        return self.dp_reduce + self.dp_gather

    @property
    def total(self) -> float:
        return self.tp + self.dp + self.pp


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def link_of(group: Group, tp: int, pp: int, dp: int, gpus_per_node: int) -> Link:
    """``"intra"`` when every ``group`` (all tp groups, or all dp groups, ...) lies within one node.

    Global rank = ``pp_rank * (dp * tp) + dp_rank * tp + tp_rank``; e.g. tp=4, dp=2 on 8 GPUs per node:
    the tp groups {0..3}, {4..7} and the dp groups {0, 4}, {1, 5}, ... each fit on node 0 (intra), while
    with dp=4 the dp group {0, 4, 8, 12} spans two nodes (inter).
    """
    _check_sizes(tp=tp, pp=pp, dp=dp, gpus_per_node=gpus_per_node)
    stride, size = {"tp": (1, tp), "dp": (tp, dp), "pp": (tp * dp, pp)}[group]
    for first in range(tp * dp * pp):
        if (first // stride) % size != 0:
            continue  # not the lowest rank of its group
        last = first + stride * (size - 1)
        if first // gpus_per_node != last // gpus_per_node:
            return "inter"
    return "intra"


def _pp_sends_per_micro_batch(pp: int, n_chunks: int) -> int:
    """Messages the busiest stage sends per micro-batch: one activation out of every virtual stage but
    the last, one gradient out of every virtual stage but the first."""
    n_virtual = pp * n_chunks
    sends = []
    for stage in range(pp):
        virtuals = [chunk * pp + stage for chunk in range(n_chunks)]
        sends.append(sum(v < n_virtual - 1 for v in virtuals) + sum(v > 0 for v in virtuals))
    return max(sends)


def step_communication(
    *,
    tp: int,
    pp: int,
    dp: int,
    zero_stage: int,
    gpus_per_node: int,
    params_per_rank: float,
    trainable_per_rank: float,
    compute_bytes: int,
    reduce_bytes: int,
    layers_per_stage: int,
    tokens_per_micro_batch: int,
    hidden_size: int,
    n_micro: int,
    sequence_parallel: bool = False,
    n_chunks: int = 1,
    recomputed_layers: int = 0,
) -> CommunicationVolume:
    """Per-rank bytes per step (module docstring has the formulas).

    ``params_per_rank``/``trainable_per_rank``: numel of this rank's tensor-parallel slice of its stage
    (all its chunks), before data-parallel sharding. ``layers_per_stage``: tensor-parallel layers on this
    rank over all its chunks; ``recomputed_layers`` of them are recomputed in the backward.
    ``tokens_per_micro_batch``: micro_batch_size * seq_len.
    """
    _check_sizes(tp=tp, pp=pp, dp=dp, gpus_per_node=gpus_per_node, n_micro=n_micro, n_chunks=n_chunks)
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if not 0 <= recomputed_layers <= layers_per_stage:
        raise ValueError(f"recomputed_layers ({recomputed_layers}) must be in [0, layers_per_stage={layers_per_stage}]")
    activation = float(tokens_per_micro_batch) * hidden_size * compute_bytes  # one [tokens, hidden] tensor

    # tp: 2 all-reduces forward + 2 backward per layer, 2 more per recomputed layer, every micro-batch
    all_reduces = 4 * layers_per_stage + 2 * recomputed_layers
    tp_bytes = n_micro * all_reduces * 2 * (tp - 1) / tp * activation

    share = (dp - 1) / dp
    grads = trainable_per_rank * reduce_bytes
    params = params_per_rank * compute_bytes
    if zero_stage == 0:
        reduce_calls, gather_calls = 1, 0
        dp_reduce = 2 * share * grads
    else:
        reduce_calls = n_micro if zero_stage >= 2 else 1
        gather_calls = n_micro * (2 if zero_stage == 3 else 1)
        dp_reduce = reduce_calls * share * grads
    dp_gather = gather_calls * share * params
    if dp == 1:
        reduce_calls = gather_calls = 0

    message = activation / tp if sequence_parallel else activation
    pp_bytes = n_micro * _pp_sends_per_micro_batch(pp, n_chunks) * message if pp > 1 else 0.0
    links: dict[Group, Link] = {g: link_of(g, tp, pp, dp, gpus_per_node) for g in ("tp", "dp", "pp")}
    return CommunicationVolume(
        tp=tp_bytes,
        dp_reduce=dp_reduce,
        dp_gather=dp_gather,
        pp=pp_bytes,
        pp_message=message if pp > 1 else 0.0,
        dp_reduce_calls=reduce_calls,
        dp_gather_calls=gather_calls,
        links=links,
    )
