"""``ParallelModule``: this rank's layers of a model described as layer specs, and the step that runs
micro-batches through the pipeline schedule.

What one call of :meth:`ParallelModule.train_step` does on every rank:

1. zero the gradients (they live in the data-parallel bucket buffers);
2. execute this stage's instruction list (:mod:`scaling.core.pipeline.schedule`): receive, forward,
   send, receive gradient, backward, send gradient;
3. make the gradients final through the gradient-sync protocol (``grad_sync.py``): averaged over
   data-parallel ranks (bucketed all-reduce for ZeRO stage 0, FSDP2 reduce-scatter into shards for stages
   1-3, started during the backward pass), partial sums over tensor-parallel ranks, tied copies over the
   stages that hold them;
4. return the loss averaged over micro-batches and data-parallel ranks, on every rank.

With ``pp == 1`` the schedule degenerates to plain gradient accumulation. The result equals one process
running all ``n_micro x dp`` micro-batches with the loss of each scaled by ``1 / (n_micro x dp)``.
"""

from __future__ import annotations

import functools
import itertools
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from scaling.core.nn.dropout import DropoutKey, dropout_key
from scaling.core.nn.param_meta import get_param_meta
from scaling.core.nn.param_table import ParamRecord, ParamTable
from scaling.core.nn.precision import PrecisionConfig, cast_floating
from scaling.core.pipeline.checkpointing import checkpointed
from scaling.core.pipeline.grad_reduce import GradReducer
from scaling.core.pipeline.layer_spec import LayerSpec, TiedLayerSpec
from scaling.core.pipeline.p2p import (
    HeaderCache,
    gradient_leaves,
    recv_activation,
    recv_grads,
    send_activation,
    send_grads,
)
from scaling.core.pipeline.partition import partition
from scaling.core.pipeline.schedule import (
    Backward,
    Forward,
    Instruction,
    RecvActivation,
    RecvGrad,
    SendActivation,
    SendGrad,
    build_schedule,
    forward_only,
)
from scaling.core.topology.config import ActivationCheckpointingType
from scaling.core.topology.rank_math import Coord, pipe_parallel_groups, rank_of
from scaling.core.topology.rng import RngTracker
from scaling.core.topology.topology import Topology
from scaling.core.zero.fully_sharded import shard_stage
from scaling.core.zero.grad_sync import (
    BucketedAllReduce,
    CallerReducedGrads,
    FullyShardedGrads,
    GradSync,
    ModelParallelSums,
)
from scaling.core.zero.policy import ShardingPolicy
from scaling.core.zero.tensors import assign_full, local_part

__all__ = ["LossFn", "ParallelModule", "StepResult"]

LossFn = Callable[[Any, Any], tuple[torch.Tensor, Mapping[str, torch.Tensor]]]


@dataclass
class StepResult:
    """``loss``: mean over micro-batches and data-parallel ranks, identical on every rank.
    ``metrics``: the loss function's metrics averaged the same way; filled on the last pipeline stage only."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _TiedGroup:
    key: str
    group: dist.ProcessGroup | None  # None when only this rank holds the key
    src: int  # global rank whose copy initialises the others
    names: list[str]  # canonical names of the tied parameters
    owner: bool  # this rank's copy is the one counted in model-wide norms


def _identity(batch: Any) -> Any:
    return batch


class ParallelModule(nn.Module):
    """Builds this rank's layers from ``layer_specs`` and runs pipeline-parallel training steps.

    Args:
        layer_specs: the whole model, first layer to last.
        topology: this rank's layout; its config chooses partitioning, schedule, virtual stages,
            activation checkpointing and the data-parallel bucket size.
        loss_fn: ``loss_fn(last_layer_output, batch) -> (loss, metrics)`` on the last stage.
        input_fn: turns a micro-batch into the first layer's input (default: the batch itself).
        seed: keys layout-independent dropout masks.
        rng_tracker: rewound for recomputation under activation checkpointing, if given.
        precision: dtype of parameters and of floating-point model inputs, and whether gradients are
            averaged in fp32 (the optimizer reads them through ``main_grad``). Default: fp32 throughout.
        adapt: called as ``adapt(layer, index)`` on each built layer before anything else sees it
            (finetuning wraps projections and freezes parameters here, before gradient buckets exist).
        weight_fn: the weight of a micro-batch's loss (e.g. its number of loss tokens). Given, every
            micro-batch counts in proportion to it over the whole step and all data-parallel ranks, so a
            token-averaged loss is averaged over tokens exactly as one process would; otherwise every
            micro-batch counts the same.
        sharding: the ZeRO stage (default 0). Stages 1-3 keep fp32 parameters as sharded masters (FSDP2
            over the data-parallel group, one unit per layer) and compute in ``precision``.
        meta_init: with ZeRO 1-3, build the layers on the ``meta`` device, shard them, and only then
            materialise this rank's shards layer by layer from the layers' own seeded initialisation: no
            rank ever holds more than one layer beyond its shards, and the weights are those of any other
            layout, bit for bit.
    """

    instruction_hook: Callable[[int, Instruction], None] | None = None  # (step, instr): the trainer's heartbeat

    def __init__(
        self,
        layer_specs: Sequence[LayerSpec],
        topology: Topology,
        loss_fn: LossFn,
        *,
        input_fn: Callable[[Any], Any] = _identity,
        seed: int = 0,
        rng_tracker: RngTracker | None = None,
        precision: PrecisionConfig | None = None,
        adapt: Callable[[nn.Module, int], nn.Module] | None = None,
        weight_fn: Callable[[Any], torch.Tensor] | None = None,
        sharding: ShardingPolicy | None = None,
        meta_init: bool = False,
    ) -> None:
        super().__init__()
        config = topology.config
        precision = precision or PrecisionConfig()
        self.dtype = precision.precision.dtype
        self.sharding = sharding or ShardingPolicy()
        if meta_init and not self.sharding.uses_fsdp:
            raise ValueError("meta_init needs ZeRO stage 1, 2 or 3 (stage 0 holds every weight whole anyway)")
        self._adapt = adapt
        self.topology = topology
        self.loss_fn = loss_fn
        self.input_fn = input_fn
        self.weight_fn = weight_fn
        self.seed = seed
        self.rng_tracker = rng_tracker
        self.pp, self.stage = topology.pp_size, topology.pp_rank
        self.n_chunks = config.virtual_pipe_stages
        self.n_virtual = self.pp * self.n_chunks
        self.checkpointing = config.activation_checkpointing_type
        self.specs = list(layer_specs)

        method = config.pipe_partition_method
        method_arg = method if isinstance(method, list) else method.value
        weights = _parameter_counts(self.specs) if method_arg == "balanced" else None
        self.virtual_ranges = partition(len(self.specs), self.n_virtual, method_arg, weights)
        self.chunk_ranges = [self.virtual_ranges[c * self.pp + self.stage] for c in range(self.n_chunks)]

        self.layers = nn.ModuleDict()
        for layer_range in self.chunk_ranges:
            for index in layer_range:
                self.layers[str(index)] = self._build_layer(index, meta=meta_init)
        self._canonical_of: dict[str, str] = {}  # native name -> canonical name, for tied copies
        self._tied = self._tie_weights()
        self.param_table = self._build_param_table()

        uses: dict[str, int] = {}
        for layer_range in self.chunk_ranges:
            names = {name for index in layer_range for name, _ in self._named_in_layer(index)}
            for name in names:
                uses[name] = uses.get(name, 0) + 1
        sums = ModelParallelSums(
            topology.tp_group,
            [r.name for r in self.param_table.values() if r.partial_grad_over_tp and r.trainable],
            [(t.names, t.group) for t in self._tied if t.group is not None],
        )
        reduce_dtype = torch.float32 if precision.reduce_grads_in_fp32 else None
        self.grad_sync: GradSync
        if self.sharding.uses_fsdp:
            units = self._sharding_units()
            assert topology.dp_group is not None, "ZeRO stages 1-3 need a data-parallel process group"
            shard_stage(
                self,
                [[self.layers[str(i)] for i in unit] for unit in units],
                group=topology.dp_group,
                device=topology.device,
                policy=self.sharding,
                compute_dtype=self.dtype,
                reduce_dtype=reduce_dtype,
                keep_gathered=[i for i, unit in enumerate(units) if unit == [self.chunk_ranges[-1][-1]]],
            )
            if meta_init:
                self._materialise()
            self._prefetch_next_layers(units)
            chunk_units = {
                chunk: [self.layers[str(i)] for i in layer_range] for chunk, layer_range in enumerate(self.chunk_ranges)
            }
            self.grad_sync = FullyShardedGrads(
                self.named_parameters_by_name(), chunk_units, self.sharding.sync_every_micro_batch, sums
            )
        elif self.sharding.reduced_by_caller:
            self.grad_sync = CallerReducedGrads(self.named_parameters_by_name(), sums)
        else:
            reducer = GradReducer(
                self.named_parameters_canonical(),
                topology.dp_group,
                topology.dp_size,
                int(config.grad_reduce_bucket_mb * 2**20),
                reduce_dtype=reduce_dtype,
            )
            self.grad_sync = BucketedAllReduce(reducer, uses, sums)
        # Separate process groups give activations and gradients separate FIFO channels (see schedule.py).
        self._act_group = topology.pp_group
        self._grad_group: dist.ProcessGroup = topology.pp_group
        if self.pp > 1:
            _, grad_group = topology.create_groups(pipe_parallel_groups(topology.sizes))
            assert grad_group is not None
            self._grad_group = grad_group
        self._local: dict[tuple[str, int], deque[Any]] = {}
        self._headers = HeaderCache()

    # Construction ---------------------------------------------------------------------------------
    def _build_layer(self, index: int, *, meta: bool = False) -> nn.Module:
        """Layer ``index`` as its spec builds it (adapted for finetuning), in the dtype it is kept in.
        Sharded stages keep fp32 parameters: they are the optimizer's masters (FSDP2 casts them to the
        compute dtype when it gathers them). ``meta``: on the meta device, or for real (one layer) when
        its constructor cannot run there."""
        dtype = torch.float32 if self.sharding.uses_fsdp else self.dtype

        def build() -> nn.Module:
            layer = self.specs[index].build()
            return self._adapt(layer, index) if self._adapt is not None else layer

        if meta:
            try:
                with torch.device("meta"):
                    return build().to(dtype=dtype)
            except (RuntimeError, NotImplementedError):
                pass
        return build().to(device=self.topology.device, dtype=dtype)

    def _materialise(self) -> None:
        """Allocate the meta-built shards and fill them, one layer at a time, from a real build of that
        layer (the same seeded recipe as any other layout); then make tied copies equal their owner's."""
        self.to_empty(device=self.topology.device)
        params = self.named_parameters_by_name()
        for index in self.layers:
            built = self._build_layer(int(index))
            for name, value in _transparent_named_parameters(built, f"layers.{index}"):
                target = params.get(self.canonical_name(name))
                if target is not None:
                    assign_full(target, value.detach())
            own_buffers = dict(self.layers[index].named_buffers())
            with torch.no_grad():
                for name, buffer in built.named_buffers():
                    own_buffers[name].copy_(buffer)
            del built
        for tied in self._tied:
            if tied.group is not None:
                for name in tied.names:
                    if name in params:
                        dist.broadcast(local_part(params[name]).data, src=tied.src, group=tied.group)

    def _stages_of(self, index: int) -> int:
        virtual = next(v for v, r in enumerate(self.virtual_ranges) if index in r)
        return virtual % self.pp

    def _tie_weights(self) -> list[_TiedGroup]:
        """Share tied parameters on this rank; create one group per key over the stages holding it."""
        keys: dict[str, list[int]] = {}
        for index, spec in enumerate(self.specs):
            if isinstance(spec, TiedLayerSpec):
                keys.setdefault(spec.key, []).append(index)
        tied: list[_TiedGroup] = []
        coord = self.topology.coord
        sizes = self.topology.sizes
        for key in sorted(keys):
            indices = keys[key]
            stages = sorted({self._stages_of(i) for i in indices})
            spec0 = self.specs[indices[0]]
            assert isinstance(spec0, TiedLayerSpec)
            attributes = spec0.tied_weight_attributes
            owner: nn.Module | None = None
            for index in indices:
                if str(index) not in self.layers:
                    continue
                layer = self.layers[str(index)]
                if owner is None:
                    owner = layer
                    continue
                for attr in attributes:
                    mine, theirs = getattr(owner, attr), getattr(layer, attr)
                    if mine.shape != theirs.shape:
                        raise ValueError(
                            f"tied key {key!r}: attribute {attr!r} has shape {tuple(theirs.shape)} in layer {index} "
                            f"but {tuple(mine.shape)} in layer {indices[0]}"
                        )
                    setattr(layer, attr, mine)
            group: dist.ProcessGroup | None = None
            if len(stages) > 1:
                families = [
                    [rank_of(Coord(s, d, t), sizes) for s in stages] for d in range(sizes.dp) for t in range(sizes.tp)
                ]
                _, group = self.topology.create_groups(families)
            if owner is None:
                continue
            names = [f"layers.{indices[0]}.{attr}" for attr in attributes]
            for index in indices:
                if str(index) in self.layers:
                    for attr, name in zip(attributes, names, strict=True):
                        self._canonical_of[f"layers.{index}.{attr}"] = name
            src = rank_of(Coord(stages[0], coord.dp, coord.tp), sizes)
            tied.append(_TiedGroup(key, group, src, names, owner=src == self.topology.global_rank))
            if group is not None:
                for attr in attributes:  # start from identical copies whatever each stage's init did
                    data = getattr(owner, attr).data
                    if not data.is_meta:  # meta-built layers get their copies after materialising
                        dist.broadcast(data, src=src, group=group)
        return tied

    def _named_in_layer(self, index: int) -> list[tuple[str, nn.Parameter]]:
        """Canonical ``(name, parameter)`` of one layer on this rank."""
        named = _transparent_named_parameters(self.layers[str(index)], f"layers.{index}")
        return [(self._canonical_of.get(name, name), p) for name, p in named]

    def _build_param_table(self) -> ParamTable:
        """Each parameter's facts, read once from the freshly built layers (before any sharding)."""
        tied_of = {name: t for t in self._tied for name in t.names}
        tp = self.topology.tp_size
        records = []
        for name, p in self.named_parameters_canonical():
            meta = get_param_meta(p)
            shape = list(p.shape)
            if meta.tp_split_dim is not None:
                shape[meta.tp_split_dim] *= tp
            tied = tied_of.get(name)
            records.append(
                ParamRecord(
                    name=name,
                    layer=_layer_of(name),
                    shape=tuple(shape),
                    tp_split_dim=meta.tp_split_dim,
                    tp_parts=1 if meta.tp_split_dim is None else tp,
                    tied_key=tied.key if tied is not None else None,
                    tied_owner=tied.owner if tied is not None else True,
                    partial_grad_over_tp=meta.partial_grad_over_tp,
                    trainable=p.requires_grad,
                )
            )
        return ParamTable(records)

    def _prefetch_next_layers(self, units: list[list[int]]) -> None:
        """Within each model chunk, gather the next layer while this one computes (forward) and the
        previous one while this one's gradients are computed (backward), instead of on first use. Units of
        several layers (a tied embedding and head) share one FSDP state, so they prefetch nothing."""
        single = {unit[0] for unit in units if len(unit) == 1}
        for layer_range in self.chunk_ranges:
            chain = [self.layers[str(i)] for i in layer_range if i in single]
            for before, after in itertools.pairwise(chain):
                assert isinstance(before, FSDPModule) and isinstance(after, FSDPModule)
                before.set_modules_to_forward_prefetch([after])
                after.set_modules_to_backward_prefetch([before])

    def _sharding_units(self) -> list[list[int]]:
        """Layers of this rank grouped into FSDP units: one per layer, except that layers sharing a
        parameter object (a tied embedding and head on one stage) form one unit."""
        owner_of: dict[int, int] = {}  # object id -> first layer holding it, only while grouping
        parent = {int(i): int(i) for i in self.layers}

        def root(i: int) -> int:
            while parent[i] != i:
                i = parent[i]
            return i

        for index in sorted(parent):
            for p in self.layers[str(index)].parameters():
                first = owner_of.setdefault(id(p), index)
                parent[root(index)] = root(first)
        units: dict[int, list[int]] = {}
        for index in sorted(parent):
            units.setdefault(root(index), []).append(index)
        return list(units.values())

    # Running layers -------------------------------------------------------------------------------
    def forward(self, x: Any, *, chunk: int, micro: int, step: int) -> Any:
        """Run model chunk ``chunk`` of this rank on ``x``. Called once per chunk and micro-batch by the
        schedule; under ZeRO stages 1-3 this is the FSDP2 root call that gathers and frees the layers."""
        return self._run_chunk(chunk, x, micro, step)

    def _run_chunk(self, chunk: int, x: Any, micro: int, step: int) -> Any:
        indices = list(self.chunk_ranges[chunk])
        recompute = self.training and torch.is_grad_enabled()

        def run_layers(first: int, last: int, value: Any) -> Any:
            for index in indices[first:last]:
                with dropout_key(DropoutKey(self.seed, step, micro, index)):
                    value = self.layers[str(index)](value)
            return value

        if recompute and self.checkpointing == ActivationCheckpointingType.EVERY_PIPE_STAGE:
            return checkpointed(functools.partial(run_layers, 0, len(indices)), x, rng_tracker=self.rng_tracker)
        if recompute and self.checkpointing == ActivationCheckpointingType.EVERY_LAYER:
            for i in range(len(indices)):
                x = checkpointed(functools.partial(run_layers, i, i + 1), x, rng_tracker=self.rng_tracker)
            return x
        return run_layers(0, len(indices), x)

    # Point-to-point, with a local mailbox when the neighbouring virtual stage is on this rank --------
    def _neighbour(self, chunk: int, step: int) -> tuple[int, int]:
        virtual = chunk * self.pp + self.stage + step
        stage = virtual % self.pp
        rank = rank_of(Coord(stage, self.topology.dp_rank, self.topology.tp_rank), self.topology.sizes)
        return rank, virtual // self.pp

    def _send_activation(self, value: Any, chunk: int, works: list[Any]) -> None:
        dst, dst_chunk = self._neighbour(chunk, +1)
        if dst == self.topology.global_rank:
            self._local.setdefault(("act", dst_chunk), deque()).append(_detach_tree(value))
        else:
            works += send_activation(value, dst, self._act_group, self.topology.device, self._headers)

    def _recv_activation(self, chunk: int) -> tuple[Any, list[torch.Tensor]]:
        src, _ = self._neighbour(chunk, -1)
        if src == self.topology.global_rank:
            value = self._local[("act", chunk)].popleft()
            return value, gradient_leaves(value)
        return recv_activation(src, self._act_group, self.topology.device, self._headers)

    def _send_grads(self, grads: list[torch.Tensor], chunk: int, works: list[Any]) -> None:
        dst, dst_chunk = self._neighbour(chunk, -1)
        if dst == self.topology.global_rank:
            self._local.setdefault(("grad", dst_chunk), deque()).append(grads)
        else:
            works += send_grads(grads, dst, self._grad_group)

    def _recv_grads(self, like: list[torch.Tensor], chunk: int) -> list[torch.Tensor]:
        src, _ = self._neighbour(chunk, +1)
        if src == self.topology.global_rank:
            grads: list[torch.Tensor] = self._local[("grad", chunk)].popleft()
            return grads
        return recv_grads(like, src, self._grad_group)

    # Steps ----------------------------------------------------------------------------------------
    def train_step(self, batches: Sequence[Any], *, step: int = 0, loss_scale: float = 1.0) -> StepResult:
        """Forward and backward of every micro-batch in ``batches``; gradients end up in ``param.grad``.

        ``batches`` has one entry per micro-batch (entries may be None on stages that need no data: only
        the first stage reads inputs and only the last reads targets). ``loss_scale`` multiplies the loss
        before backward (fp16 loss scaling); the returned loss is unscaled.
        """
        self.train()
        n_micro = len(batches)
        schedule = build_schedule(
            self.topology.config.pipe_schedule if self.n_chunks > 1 else _one_chunk(self.topology.config.pipe_schedule),
            n_micro,
            self.pp,
            self.stage,
            self.n_chunks,
        )
        self.grad_sync.start(n_micro)
        shares = self._shares(batches)
        losses, metrics = self._execute(schedule, batches, step, [s * loss_scale for s in shares], backward=True)
        self.grad_sync.finish()
        return self._reduce_results(losses, metrics, shares)

    def _shares(self, batches: Sequence[Any]) -> list[torch.Tensor | float]:
        """Each micro-batch's share of the step's loss, such that the dp average gives the one-process value."""
        n_micro = len(batches)
        if self.weight_fn is None or not self.topology.is_last_pipe_stage:
            return [1.0 / n_micro] * n_micro
        weights = torch.stack([self.weight_fn(batch).float().reshape(()) for batch in batches])
        total = weights.sum()
        if self.topology.dp_size > 1:
            dist.all_reduce(total, group=self.topology.dp_group)
        return list(weights * self.topology.dp_size / total.clamp(min=1e-12))

    @torch.no_grad()
    def eval_step(self, batches: Sequence[Any], *, step: int = 0) -> StepResult:
        """Forward only, no gradients; the loss averaged as in :meth:`train_step`."""
        self.eval()
        schedule = forward_only(len(batches), self.pp, self.stage, self.n_chunks)
        shares = self._shares(batches)
        losses, metrics = self._execute(schedule, batches, step, shares, backward=False)
        return self._reduce_results(losses, metrics, shares)

    def _execute(
        self,
        schedule: list[Instruction],
        batches: Sequence[Any],
        step: int,
        scales: Sequence[torch.Tensor | float],
        *,
        backward: bool,
    ) -> tuple[dict[int, torch.Tensor], list[Mapping[str, torch.Tensor]]]:
        n_micro = len(batches)
        last_virtual = self.n_virtual - 1
        received: dict[tuple[int, int], tuple[Any, list[torch.Tensor]]] = {}
        outputs: dict[tuple[int, int], Any] = {}
        out_grads: dict[tuple[int, int], list[torch.Tensor]] = {}
        works: list[Any] = []
        losses: dict[int, torch.Tensor] = {}
        metrics: list[Mapping[str, torch.Tensor]] = []
        last_backward = {instr.chunk: i for i, instr in enumerate(schedule) if isinstance(instr, Backward)}
        for position, instr in enumerate(schedule):
            key = (instr.micro, instr.chunk)
            virtual = instr.chunk * self.pp + self.stage
            if self.instruction_hook is not None:  # a hang then names the instruction it stopped in
                self.instruction_hook(step, instr)
            match instr:
                case RecvActivation(micro, chunk):
                    received[key] = self._recv_activation(chunk)
                case Forward(micro, chunk):
                    first = virtual == 0
                    x = cast_floating(self.input_fn(batches[micro]), self.dtype) if first else received[key][0]
                    global_micro = self.topology.dp_rank * n_micro + micro
                    y = self(x, chunk=chunk, micro=global_micro, step=step)
                    if virtual == last_virtual:
                        loss, micro_metrics = self.loss_fn(y, batches[micro])
                        losses[micro] = loss.detach()
                        metrics.append({k: v.detach() for k, v in micro_metrics.items()})
                        if backward:
                            outputs[key] = loss * scales[micro]
                    else:
                        outputs[key] = y
                case SendActivation(micro, chunk):
                    self._send_activation(outputs[key], chunk, works)
                    if not backward:
                        del outputs[key]
                case RecvGrad(micro, chunk):
                    out_grads[key] = self._recv_grads(gradient_leaves(outputs[key]), chunk)
                case Backward(micro, chunk):
                    self.grad_sync.before_backward(chunk, last=last_backward[chunk] == position)
                    if virtual == last_virtual:
                        outputs.pop(key).backward()
                    else:
                        tensors = gradient_leaves(outputs.pop(key))
                        torch.autograd.backward(tensors, out_grads.pop(key))
                case SendGrad(micro, chunk):
                    _, leaves = received.pop(key)
                    grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
                    self._send_grads(grads, chunk, works)
        for work in works:
            work.wait()
        return losses, metrics

    def _reduce_results(
        self,
        losses: dict[int, torch.Tensor],
        metrics: list[Mapping[str, torch.Tensor]],
        shares: Sequence[torch.Tensor | float],
    ) -> StepResult:
        topo = self.topology
        loss = torch.zeros((), device=topo.device)
        for micro, value in losses.items():  # only the last stage has losses
            loss = loss + shares[micro] * value.float()
        if self.pp > 1:  # the loss lives on the last stage; every rank reports it
            last = rank_of(Coord(self.pp - 1, topo.dp_rank, topo.tp_rank), topo.sizes)
            dist.broadcast(loss, src=last, group=topo.pp_group)
        averaged: dict[str, torch.Tensor] = {}
        if metrics:
            names = sorted(metrics[0])
            averaged = {n: torch.stack([m[n].float() for m in metrics]).mean() for n in names}
        if topo.dp_size > 1:
            packed = torch.stack([loss, *[averaged[n] for n in sorted(averaged)]])
            dist.all_reduce(packed, group=topo.dp_group)
            packed /= topo.dp_size
            loss = packed[0]
            averaged = {n: packed[i + 1] for i, n in enumerate(sorted(averaged))}
        return StepResult(loss=loss, metrics=averaged)

    def named_parameters_canonical(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` with names that do not depend on the layout.

        A tied weight is named after the first layer holding it (``layers.0.weight`` for an embedding
        tied to the head), on every stage, so configs (parameter groups) and checkpoints address it the
        same way on any layout. Other parameters keep their ``named_parameters`` names.
        """
        named: list[tuple[str, nn.Parameter]] = []
        seen_names: set[str] = set()
        seen_objects: set[int] = set()  # within this walk only: one tensor under two attribute paths
        for index in self.layers:
            for name, p in self._named_in_layer(int(index)):
                # A tied weight shared by two layers of this rank, or held by one layer under two
                # attributes (the embedding's ``weight`` alias), appears once, under its first name.
                if name not in seen_names and id(p) not in seen_objects:
                    seen_names.add(name)
                    seen_objects.add(id(p))
                    named.append((name, p))
        return named

    def canonical_name(self, name: str) -> str:
        """The layout-free name of a parameter known here by its module path (``layers.{i}.{key}``)."""
        return self._canonical_of.get(name, name)

    def named_parameters_by_name(self) -> dict[str, nn.Parameter]:
        """Canonical name -> this rank's current parameter object (a sharded DTensor under ZeRO 1-3)."""
        return dict(self.named_parameters_canonical())

    def is_tied_copy(self, name: str) -> bool:
        """True for a tied weight held by a stage that is not its first holder (checkpoints skip it)."""
        record = self.param_table[name]
        return record.tied_key is not None and not record.tied_owner

    def main_grad(self, name: str) -> torch.Tensor | None:
        """The final gradient of this rank's part of parameter ``name`` after :meth:`train_step` (fp32 when
        reducing in fp32; this rank's shard under ZeRO stages 1-3)."""
        return self.grad_sync.grad(name)

    def names_counted_in_norm(self) -> list[str]:
        """The parameters whose gradients this rank adds to a model-wide norm, so each weight counts once.

        Split parameters count on every tp rank (each holds a different slice); replicated ones only on tp
        rank 0; tied copies only on the first stage holding them. Summing over the model-parallel group
        (tp x pp) then gives the norm of the full model (and over data-parallel ranks too for shards).
        """
        tp_rank = self.topology.tp_rank
        return [r.name for r in self.param_table.values() if r.counted_in_norm(tp_rank)]

    def extra_repr(self) -> str:
        ranges = ", ".join(f"chunk {c}: layers {r.start}..{r.stop - 1}" for c, r in enumerate(self.chunk_ranges))
        return f"stage={self.stage}/{self.pp}, {ranges}"


def _transparent_named_parameters(module: nn.Module, prefix: str) -> list[tuple[str, nn.Parameter]]:
    """``named_parameters`` in which wrapper modules do not add a path segment.

    A module that wraps another (LoRA around a projection, an adapter around a block) names the wrapped
    child in ``_transparent_child``; its parameters keep the names they had unwrapped, so a base
    checkpoint loads into an adapted model and adapter names sit next to the weights they adapt.
    """
    named = [(f"{prefix}.{name}", p) for name, p in module.named_parameters(recurse=False)]
    transparent = getattr(module, "_transparent_child", None)
    for child_name, child in module.named_children():
        child_prefix = prefix if child_name == transparent else f"{prefix}.{child_name}"
        named.extend(_transparent_named_parameters(child, child_prefix))
    return named


def _layer_of(name: str) -> int:
    return int(name.split(".")[1])


def _one_chunk(schedule: str) -> str:
    return "1f1b" if schedule == "interleaved_1f1b" else schedule


def _detach_tree(value: Any) -> Any:
    """A stage boundary on one rank: cut the graph, keep gradient flow through fresh leaves."""
    from torch.utils import _pytree as pytree

    def cut(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            fresh = leaf.detach()
            if leaf.is_floating_point() and leaf.requires_grad:
                fresh.requires_grad_(True)
            return fresh
        return leaf

    return pytree.tree_map(cut, value)


def _parameter_counts(specs: Sequence[LayerSpec]) -> list[int]:
    """Parameter count of each layer, for balanced partitioning.

    Each layer is built on the meta device (no memory, no initialisation); a layer whose constructor does
    not work there is built for real, one at a time, and dropped right after counting.
    """
    counts = []
    for spec in specs:
        try:
            with torch.device("meta"):
                layer = spec.build()
        except (RuntimeError, NotImplementedError):
            layer = spec.build()
        counts.append(sum(p.numel() for p in layer.parameters()))
        del layer
    return counts
