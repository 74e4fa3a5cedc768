"""Per-rank memory of a training step as a pure function of the parameter table, ZeRO stage, precision
and layout: the numbers the start-up log line prints, so a run that will not fit says so before it
allocates anything.

Notation (all per rank, counted *before* data-parallel sharding, i.e. this rank's tensor-parallel slice
of its pipeline stage's parameters):

* ``N`` parameters, ``T`` of them trainable, ``U`` the numel of the largest unit (an FSDP unit is one
  layer; a tied embedding and head are one unit), ``d`` the data-parallel size, ``m`` the micro-batches
  per step;
* ``c`` bytes per element of the compute dtype (the training precision), ``r`` of the gradient
  reduction dtype; fp32 master weights and the two AdamW moments take 4 + 8 bytes per trainable element.

Where each term comes from (and what the tests measure; ``tests/core/test_memory_estimate.py``):

Stage 0 (bucketed all-reduce, the existing :class:`~scaling.core.optimizer.optimizer.Optimizer`):
  weights ``cN``; fp32 masters ``4T`` only when ``c < 4`` (fp32 weights *are* views of the master);
  gradient buckets ``rT``, plus autograd's own ``cT`` when the buckets reduce in a wider dtype; the
  optimizer reads the buckets as its gradients, so only gradients reduced in a narrower dtype than fp32
  take an fp32 copy ``4T``; Adam ``8T``. Transient: one unit's fresh gradient ``cU`` before autograd
  accumulates it into the bucket.

Stages 1-3 (FSDP2 ``fully_shard`` per unit over the data-parallel group): the sharded fp32 parameters
are the masters, ``4N/d``; Adam ``8T/d``; sharded fp32 gradients ``4T/d``. Reducing one unit's gradient
holds its unsharded gradient ``cU``, the reduce-scatter input in the reduce dtype ``rU`` and its output
``rU/d``.

* Stages 1 and 2 keep every unit unsharded from its forward to its backward (``cN`` at the start of
  backward, the peak). Stage 2 then also holds the sharded gradients of earlier micro-batches
  (``4T/d`` when ``m > 1``); stage 1 skips the reduction before the last micro-batch, so it holds the
  unsharded gradients accumulated in the reduce dtype instead (``rT`` when ``m > 1``).
* Stage 3 reshards each unit after its forward and gathers it again for backward: the peak is in the
  backward pass with the current and the prefetched unit unsharded (``2cU``) on top of the gradient
  work, and the gradients of all but the two units in flight already reduced (all of them when
  ``m > 1``, from the previous micro-batch).

The optimizer step itself holds parameters + gradients + optimizer state (fused AdamW allocates no
full-size temporaries), which is below the peak for every stage above, but is taken into the maximum.
Activations are not included (``activation_bytes`` adds them): the formula is calibrated on a model
whose activations are small next to its weights. With ``offload`` the sharded parameters, gradients
and optimizer state live in host memory; ``peak`` is then the device's and ``host`` holds the rest
(an estimate: CPU-only tests cannot tell devices apart).

``reshard_after_forward`` swaps the two ways of holding weights (all gathered from forward to backward,
or two units at a time) for the stage's default.

Counts ignore FSDP2's padding of each shard's first dimension to a multiple of ``d`` (at most ``d - 1``
rows per parameter).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = [
    "MemoryEstimate",
    "ParamSize",
    "estimate_memory",
    "format_memory_line",
    "human_bytes",
    "param_sizes",
]

_MASTER = 4  # fp32 master weights
_ADAM = 8  # two fp32 moments


@dataclass(frozen=True)
class ParamSize:
    """One parameter as the estimate needs it: its numel on this rank before data-parallel sharding
    (tensor-parallel local), whether it trains, and its unit (layer index; give a tied embedding and head
    the same one, since they are one FSDP unit). Tied copies must appear once.

    From the engine's parameter table: :func:`param_sizes`.
    """

    name: str
    numel: int
    trainable: bool = True
    layer: int = 0


class TableRecord(Protocol):
    """What :func:`param_sizes` reads of a parameter-table record (``scaling.core.nn.ParamRecord``)."""

    @property
    def name(self) -> str: ...
    @property
    def local_numel(self) -> int: ...
    @property
    def trainable(self) -> bool: ...
    @property
    def layer(self) -> int: ...


def param_sizes(records: Iterable[TableRecord]) -> list[ParamSize]:
    """The estimate's input from the engine's parameter table: ``param_sizes(module.param_table.values())``.

    The table holds this rank's parameters once each (a tied embedding and head under the embedding's
    name and layer), with their tensor-parallel local sizes, which is exactly what the estimate counts."""
    return [ParamSize(r.name, r.local_numel, r.trainable, r.layer) for r in records]


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank. ``parameters``, ``gradients`` and ``optimizer`` are what a step holds throughout
    (``optimizer`` includes fp32 masters kept apart from the weights); ``peak`` is the largest total at
    any moment of the step, which also counts transient unsharded units and reduction buffers, so it is
    not their sum. With offload, ``host`` is what lives in host memory instead of on the device."""

    zero_stage: int
    dp: int
    compute_dtype: torch.dtype
    n_params: int
    n_trainable: int
    parameters: int
    gradients: int
    optimizer: int
    peak: int
    offload: bool = False
    host: int = 0
    transient: int = 0  # the part of ``peak`` that one unit's gradient reduction holds for a moment

    @property
    def steady_peak(self) -> int:
        """``peak`` without the reduction transient: what the step holds while no unit is being reduced
        (the planner adds activations, whose own backward transient does not coincide with it)."""
        return self.peak - self.transient

    @property
    def peak_bytes_per_parameter(self) -> float:
        """Peak bytes over this rank's parameters before sharding (the figure the benchmark compares)."""
        return self.peak / max(self.n_params, 1)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def estimate_memory(
    params: Sequence[ParamSize],
    *,
    zero_stage: int,
    dp: int,
    compute_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype | None = torch.float32,
    gradient_accumulation_steps: int = 1,
    offload: bool = False,
    reshard_after_forward: bool | None = None,
    activation_bytes: int = 0,
) -> MemoryEstimate:
    """Per-rank memory of one training step (see the module docstring for each term).

    ``compute_dtype``: the training precision (``PrecisionConfig.precision.dtype``); stage 0 stores the
    weights in it, stages 1-3 store fp32 shards and unshard in it. ``reduce_dtype``: the dtype gradients
    are reduced in (``None``: the compute dtype). ``reshard_after_forward``: whether stages 1-3 free a
    unit's gathered weights after its forward (``None``: the stage's default, stage 3 only; the other
    combinations follow from the same terms but are not measured by the tests).
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if dp < 1 or gradient_accumulation_steps < 1:
        raise ValueError(f"dp ({dp}) and gradient_accumulation_steps ({gradient_accumulation_steps}) must be >= 1")
    if offload and zero_stage == 0:
        raise ValueError("offload needs zero_stage 1, 2 or 3 (stage 0 keeps whole replicas on the device)")
    n = sum(p.numel for p in params)
    t = sum(p.numel for p in params if p.trainable)
    units: dict[int, int] = {}
    for p in params:
        units[p.layer] = units.get(p.layer, 0) + p.numel
    u = max(units.values(), default=0)
    c = _itemsize(compute_dtype)
    r = _itemsize(reduce_dtype) if reduce_dtype is not None else c
    m = gradient_accumulation_steps

    if zero_stage == 0:
        parameters = c * n
        optimizer = _ADAM * t + (_MASTER * t if c < _MASTER else 0)
        gradients = r * t + (c * t if r != c else 0) + (_MASTER * t if r < _MASTER else 0)
        peak = parameters + optimizer + gradients + c * u
        return MemoryEstimate(
            0, dp, compute_dtype, n, t, parameters, gradients, optimizer, peak + activation_bytes, transient=c * u
        )

    parameters = _MASTER * n // dp
    optimizer = _ADAM * t // dp
    sharded_grads = _MASTER * t // dp
    reduce_work = c * u + r * u + r * u // dp  # one unit's unsharded gradient, reduce-scatter input and output
    # Gradients kept from earlier micro-batches: unsharded under stage 1, sharded under stages 2 and 3.
    accumulated = r * t if zero_stage == 1 and m > 1 else 0
    held = 0 if m == 1 else (accumulated or sharded_grads)
    reshard = zero_stage == 3 if reshard_after_forward is None else reshard_after_forward
    if reshard:
        gathered = 2 * c * u  # the unit in backward and the prefetched one
        if m == 1:  # the gradients of all but the two units in flight are reduced already
            held = _MASTER * (t - min(2 * u, t)) // dp
    else:
        # Every unit is gathered at the start of backward; as backward proceeds gathered weights are freed
        # while sharded gradients appear, so with one micro-batch the larger of the two ends counts.
        gathered = c * n if m > 1 else max(c * n, sharded_grads)
    backward = parameters + optimizer + held + gathered + reduce_work
    gradients = sharded_grads + accumulated
    resident_device = gathered + reduce_work + accumulated  # what stays on the device with offload
    step = parameters + optimizer + sharded_grads
    peak = max(backward, step)
    transient = reduce_work if backward >= step or offload else 0
    # With offload the shards, gradients and optimizer state live on the host; the device holds the rest.
    device_peak = resident_device if offload else peak
    return MemoryEstimate(
        zero_stage,
        dp,
        compute_dtype,
        n,
        t,
        parameters,
        gradients,
        optimizer,
        device_peak + activation_bytes,
        offload=offload,
        host=parameters + optimizer + sharded_grads if offload else 0,
        transient=transient,
    )


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'`` (binary units, as allocators and ``nvidia-smi`` count)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _human_count(n: int) -> str:
    for value, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= value:
            return f"{n / value:.1f}{suffix}"
    return str(n)


def format_memory_line(estimate: MemoryEstimate) -> str:
    """One start-up log line, e.g. ``memory per rank (ZeRO-2, dp 2, bfloat16): parameters 20.0 MiB,
    gradients 20.0 MiB, optimizer state 40.0 MiB, expected peak 103.0 MiB (10.3 B/parameter of 10.5M)``."""
    dtype = str(estimate.compute_dtype).removeprefix("torch.")
    where = f", offload: {human_bytes(estimate.host)} on the host" if estimate.offload else ""
    return (
        f"memory per rank (ZeRO-{estimate.zero_stage}, dp {estimate.dp}, {dtype}): "
        f"parameters {human_bytes(estimate.parameters)}, gradients {human_bytes(estimate.gradients)}, "
        f"optimizer state {human_bytes(estimate.optimizer)}, expected peak {human_bytes(estimate.peak)} "
        f"({estimate.peak_bytes_per_parameter:.1f} B/parameter of {_human_count(estimate.n_params)}){where}"
    )
