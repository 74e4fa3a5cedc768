"""AdamW as a ``torch.optim.Optimizer`` over named parameters, at any ZeRO stage: fp32 masters, loss
scaling, clipping and learning-rate schedules around one fused update.

It takes parameters, not a model: ``Optimizer(model.named_parameters(), config)`` trains a plain module in
a plain loop (gradients read from ``param.grad``), and ``Optimizer.for_module(module, config)`` wires it to
the engine (gradients from its gradient sync, the norm's bookkeeping from its parameter table).

One call of :meth:`Optimizer.step`:

1. read each parameter's final gradient (the engine's: the data-parallel mean, fp32 when reduced in fp32,
   this rank's shard under ZeRO 1-3); with fp16 undo the loss scale;
2. compute the global gradient norm (each weight once over tp x pp, shards summed over dp); a non-finite
   norm (or a non-finite step loss, when the caller passes it) is an overflow, seen identically by every
   rank because the norm is reduced over every rank that holds a distinct part of it and the step loss
   is the same on every rank — the step is skipped (weights and Adam state untouched) and, with fp16,
   the loss scale lowered. Deciding it reads the norm and the loss to the host once: the step's only sync;
3. clip; set each group's learning rate from its schedule;
4. run PyTorch's fused AdamW kernel on the fp32 masters of each group: an fp32 parameter (and every
   FSDP2 shard, which ZeRO 1-3 keep in fp32) is its own master, updated in place; a bf16/fp16 parameter
   has an fp32 master in its state, copied into it after the update.

The update is PyTorch's own AdamW math, so a single process with ``torch.optim.AdamW`` is the exact
reference at every stage.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.adamw import adamw

from scaling.core.config import ConfigError
from scaling.core.logging import get_logger
from scaling.core.optimizer.clipping import clip_grads_, grad_norm_by_bucket
from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.loss_scaler import DynamicLossScaler
from scaling.core.optimizer.lr_schedule import learning_rate_at
from scaling.core.optimizer.param_groups import ParamSlot, assign_groups, check_patterns, pattern_match_counts
from scaling.core.optimizer.slot_layout import SlotLayout
from scaling.core.pipeline.module import ParallelModule
from scaling.core.topology.topology import Topology
from scaling.core.zero.tensors import assign_full, gathered, is_sharded, local_part

__all__ = ["Optimizer", "OptimizerStepResult"]

_logger = get_logger("scaling.optimizer")
_STATS = ("master", "exp_avg", "exp_avg_sq")


@dataclass
class OptimizerStepResult:
    grad_norm: torch.Tensor  # before clipping
    grad_norm_clipped: torch.Tensor  # after clipping
    learning_rates: dict[str, float] = field(default_factory=dict)
    loss_scale: float = 1.0
    skipped: bool = False
    grad_norm_value: float = 0.0  # the norm on the host, read once for the skip decision (no further sync)
    loss_scale_exhausted: bool = False  # fp16: an overflow at the scaler's minimum scale; the run must stop
    # The squared gradient norm of each pipeline layer (counted as the global norm, before clipping), from
    # the same reduction as the norm; empty unless the optimizer was given each parameter's layer.
    layer_grad_squares: torch.Tensor | None = None


class Optimizer(torch.optim.Optimizer):
    """AdamW over named parameters, grouped by the config's name patterns (one group per training group
    and weight decay).

    Args:
        params: ``(name, parameter)`` pairs; those that do not require grad are left out.
        config: hyper-parameters, groups, schedules, clipping, loss scaling.
        topology: where the norm is reduced (the model-parallel group; every rank when parameters are
            sharded) and whether pattern matches are counted over pipeline stages. Default: one process.
        grad_of: the final gradient of a parameter by name (default: its ``.grad``).
        counted_in_norm: the names this rank adds to the global norm (default: all of them).
        loss_scaling: fp16 compute: dynamic loss scaling (``config.loss_scaler``).
        layer_of: each parameter's pipeline layer (of ``n_layers``): the step then also returns the
            per-layer squared gradient norms, from the norm's own reduction.
    """

    def __init__(
        self,
        params: Iterable[tuple[str, nn.Parameter]],
        config: OptimizerConfig,
        *,
        topology: Topology | None = None,
        grad_of: Callable[[str], torch.Tensor | None] | None = None,
        counted_in_norm: Collection[str] | None = None,
        loss_scaling: bool = False,
        layer_of: Mapping[str, int] | None = None,
        n_layers: int = 0,
    ) -> None:
        self.config = config
        self.topology = topology or Topology.single()
        named = [(n, p) for n, p in params if p.requires_grad]
        self._params = dict(named)
        names = [n for n, _ in named]
        counts = torch.tensor(pattern_match_counts(names, config.training_groups), dtype=torch.int64)
        if self.topology.pp_size > 1:  # each stage holds only its own layers: count matches over the pipeline
            counts = counts.to(self.topology.device)
            dist.all_reduce(counts, group=self.topology.pp_group)
        check_patterns(config.training_groups, counts.tolist())
        self.slots: list[ParamSlot] = assign_groups(names, config.training_groups)
        groups: list[dict[str, Any]] = [
            {
                "params": [self._params[n] for n in slot.names],
                "names": list(slot.names),
                "weight_decay": slot.weight_decay,
                "lr": 0.0,
                "key": slot.key,
            }
            for slot in self.slots
        ]
        if not groups:  # a stage without trainable parameters (e.g. finetuning only the first stage)
            groups = [{"params": [nn.Parameter(torch.zeros(0, device=self.topology.device))], "names": [], "lr": 0.0}]
        super().__init__(groups, {"lr": 0.0, "weight_decay": 0.0})
        self.sharded = any(is_sharded(p) for p in self._params.values())
        self._grad_of = grad_of or self._own_grad
        self._counted = set(names if counted_in_norm is None else counted_in_norm)
        self.scaler = DynamicLossScaler(config.loss_scaler) if loss_scaling and config.loss_scaler.enable else None
        self._calls = 0
        self._layer_of, self._n_layers = (dict(layer_of), n_layers) if layer_of is not None else ({}, 0)
        self._buckets: tuple[list[str], torch.Tensor] | None = None  # the counted names' layers, on the device
        for name, p in named:
            self._init_state(name, p)

    @property
    def zero_stage(self) -> int:
        return self.config.zero_stage

    @classmethod
    def for_module(cls, module: ParallelModule, config: OptimizerConfig) -> Optimizer:
        """The optimizer of the engine's ``module``: gradients from its gradient sync, the norm counted as
        its parameter table says, loss scaling when it computes in fp16."""
        if config.zero_stage != module.sharding.stage:
            raise ConfigError(
                f"optimizer.zero_stage is {config.zero_stage} but the model was built for stage "
                f"{module.sharding.stage}; build it with ParallelModule(..., sharding=config.sharding)"
            )
        return cls(
            module.named_parameters_canonical(),
            config,
            topology=module.topology,
            grad_of=module.main_grad,
            counted_in_norm=module.names_counted_in_norm(),
            loss_scaling=module.dtype == torch.float16,
            layer_of={record.name: record.layer for record in module.param_table.values()},
            n_layers=len(module.specs),
        )

    def _own_grad(self, name: str) -> torch.Tensor | None:
        grad = self._params[name].grad
        return None if grad is None else local_part(grad)

    def _init_state(self, name: str, p: nn.Parameter) -> None:
        state = self.state[p]
        if p.dtype != torch.float32:  # a narrower parameter keeps its fp32 master here
            state["master"] = local_part(p).detach().float().clone()
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        state["step"] = torch.zeros((), dtype=torch.float32, device=local_part(p).device)

    def _master(self, p: nn.Parameter) -> torch.Tensor:
        """The fp32 tensor Adam updates for ``p``: ``p``'s own storage when it is fp32 (its local shard)."""
        master = self.state[p].get("master")
        return local_part(p).data if master is None else master

    @property
    def loss_scale(self) -> float:
        """Multiply the loss by this before backward (``module.train_step(..., loss_scale=...)``)."""
        return self.scaler.scale if self.scaler is not None else 1.0

    def _grads(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter's final gradient as an fp32 tensor shaped like its master; one that got
        no gradient updates with zeros, so every layout and stage applies the same weight decay."""
        grads = {}
        for name, p in self._params.items():
            grad = self._grad_of(name)
            if grad is None:
                grad = torch.zeros_like(self._master(p))
            elif grad.dtype != torch.float32:
                grad = grad.float()
            grads[name] = grad
        return grads

    def step(  # type: ignore[override]
        self, step: int | None = None, loss: torch.Tensor | None = None
    ) -> OptimizerStepResult:
        """Update the weights from the current gradients, or skip the update when the gradient norm or the
        step's ``loss`` (``StepResult.loss``, identical on every rank) is not finite. ``step``: the training
        step, for the learning-rate schedules (default: how many times ``step`` was called before)."""
        step = self._calls if step is None else step
        self._calls = step + 1
        grads = self._grads()
        if self.scaler is not None and grads:
            torch._foreach_mul_(list(grads.values()), 1.0 / self.scaler.scale)
        topology = self.topology
        names = [name for name in grads if name in self._counted]
        counted = [grads[name] for name in names]
        # Shards over dp x weights over tp and pp: with sharded parameters every rank holds a distinct part.
        norm_group = dist.group.WORLD if self.sharded else topology.model_group
        norm, layer_squares = grad_norm_by_bucket(
            counted, norm_group, topology.device, self._bucket_index(names), self._n_layers
        )
        layers = layer_squares if self._n_layers else None
        # The one host sync of the step: skip or not (the loss travels in the same copy).
        checked = [norm.float()] if loss is None else [norm.float(), loss.detach().float().to(norm.device)]
        values = torch.stack(checked).tolist()
        norm_value = values[0]
        overflow = not all(math.isfinite(v) for v in values)
        lrs = {slot.group.name: learning_rate_at(step, slot.group.learning_rate_schedule) for slot in self.slots}
        if overflow:
            self._drop_sharded_grads()
            scale_before = self.loss_scale
            exhausted = False
            if self.scaler is not None:
                self.scaler.update(found_overflow=True)
                exhausted = self.scaler.exhausted
            what = "gradient norm" if not math.isfinite(norm_value) else "loss"
            # An fp16 overflow is the scaler's routine; any other skip the training loop reports (and counts).
            _logger.log(
                logging.WARNING if self.scaler is not None else logging.DEBUG,
                "step %d: %s is %s, update skipped; loss scale %g -> %g",
                step,
                what,
                norm_value if what == "gradient norm" else values[1],
                scale_before,
                self.loss_scale,
            )
            return OptimizerStepResult(
                norm,
                norm,
                lrs,
                scale_before,
                skipped=True,
                grad_norm_value=norm_value,
                loss_scale_exhausted=exhausted,
                layer_grad_squares=layers,
            )
        clipped = norm
        if self.config.gradient_clipping > 0 and grads:
            clipped = clip_grads_(list(grads.values()), self.config.gradient_clipping, norm)
        for slot, group in zip(self.slots, self.param_groups, strict=False):
            group["lr"] = lrs[slot.group.name]
            self._update(group, grads)
        self._drop_sharded_grads()
        scale_used = self.loss_scale
        if self.scaler is not None:
            self.scaler.update(found_overflow=False)
        return OptimizerStepResult(
            norm, clipped, lrs, scale_used, grad_norm_value=norm_value, layer_grad_squares=layers
        )

    def _bucket_index(self, names: list[str]) -> torch.Tensor | None:
        """The layer of each counted gradient, as a device tensor built once (the names are the same every step)."""
        if not self._n_layers:
            return None
        if self._buckets is None or self._buckets[0] != names:
            index = torch.tensor([self._layer_of[n] for n in names], dtype=torch.long, device=self.topology.device)
            self._buckets = (names, index)
        return self._buckets[1]

    @torch.no_grad()
    def _update(self, group: dict[str, Any], grads: dict[str, torch.Tensor]) -> None:
        params: list[nn.Parameter] = group["params"]
        states = [self.state[p] for p in params]
        masters = [self._master(p) for p in params]
        adamw(
            masters,
            [grads[name] for name in group["names"]],
            [local_part(s["exp_avg"]) for s in states],
            [local_part(s["exp_avg_sq"]) for s in states],
            [],
            [s["step"] for s in states],
            # One kernel reads and writes each state element once; the unfused path allocates full-size
            # temporaries for every parameter every step, which costs more than the update.
            fused=True,
            amsgrad=False,
            beta1=self.config.beta1,
            beta2=self.config.beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=self.config.eps,
            maximize=False,
        )
        for p, master in zip(params, masters, strict=True):
            if "master" in self.state[p]:
                local_part(p).copy_(master)

    def _drop_sharded_grads(self) -> None:
        """FSDP2 adds new gradients to existing shards: a step consumes them."""
        if self.sharded:
            for p in self._params.values():
                p.grad = None

    # Per-parameter state, the checkpoint's view -------------------------------------------------------
    def parameter_state(self, name: str) -> dict[str, torch.Tensor]:
        """Parameter ``name``'s fp32 master, exp_avg and exp_avg_sq, shaped like this rank's tensor-parallel
        slice and full over data-parallel ranks (gathered when sharded: collective over dp, so every dp rank
        asks for the same names in the same order). One parameter at a time: a checkpoint of a sharded
        model never holds more than one gathered parameter.

        Unsharded, the tensors are the optimizer's own storage: read them, do not keep them.
        """
        p = self._params[name]
        state = self.state[p]
        master = state.get("master", p.detach())
        return {
            "master": gathered(master),
            "exp_avg": gathered(state["exp_avg"]),
            "exp_avg_sq": gathered(state["exp_avg_sq"]),
        }

    def load_parameter_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`parameter_state`: copy this rank's share of ``state`` (full over dp) in. An
        fp32 parameter is its own master, so this also sets the model's weight."""
        p = self._params[name]
        own = self.state[p]
        with torch.no_grad():
            if "master" in own:
                own["master"].copy_(state["master"].reshape(own["master"].shape))
            else:
                assign_full(p, state["master"].reshape(p.shape))
            for key in ("exp_avg", "exp_avg_sq"):
                assign_full(own[key], state[key].reshape(p.shape))

    def steps_taken(self) -> dict[str, int]:
        """Adam's step count per slot key (updates applied, skipped steps excluded)."""
        return {slot.key: int(self.state[self._params[slot.names[0]]]["step"]) for slot in self.slots}

    def set_steps_taken(self, steps: dict[str, int]) -> None:
        """Adam's step count per slot key, as :meth:`steps_taken` returned it."""
        for slot in self.slots:
            for name in slot.names:
                self.state[self._params[name]]["step"].fill_(float(steps.get(slot.key, 0)))

    def reload_masters_from_params(self) -> None:
        """After the model's weights were loaded without optimizer state: masters follow the weights."""
        with torch.no_grad():
            for p in self._params.values():
                if "master" in self.state[p]:
                    self.state[p]["master"].copy_(local_part(p).float())

    # In-memory state (any stage, any data-parallel size) -------------------------------------------
    def _layout(self, slot: ParamSlot) -> SlotLayout:
        shapes = tuple(tuple(self._params[n].shape) for n in slot.names)  # a DTensor's shape is full over dp
        topology = self.topology
        parts, index = (topology.dp_size, topology.dp_rank) if self.sharded else (1, 0)
        return SlotLayout(tuple(slot.names), shapes, parts, index)

    def shard_state_dict(self) -> dict[str, Any]:
        """This rank's share of each slot's flat vectors (master, exp_avg, exp_avg_sq), plus what is needed to
        cut them anew for another data-parallel size or ZeRO stage (:meth:`load_shard_state_dicts`). Under
        ZeRO 1-3 this gathers one slot at a time (collective over dp)."""
        slots = []
        steps = self.steps_taken()
        for slot in self.slots:
            layout = self._layout(slot)
            full = {
                stat: torch.cat([self.parameter_state(n)[stat].reshape(-1).clone() for n in slot.names])
                for stat in _STATS
            }
            start, end = layout.range
            slots.append(
                {
                    "key": slot.key,
                    "names": list(slot.names),
                    "shapes": [list(s) for s in layout.shapes],
                    "numel": layout.numel,
                    "parts": layout.parts,
                    "index": layout.index,
                    "range": [start, end],
                    "step": steps[slot.key],
                    **{stat: layout.local_share(vector) for stat, vector in full.items()},
                }
            )
        return {"slots": slots, "loss_scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_shard_state_dicts(self, shards: list[dict[str, Any]]) -> None:
        """Load from the :meth:`shard_state_dict` of *all* data-parallel ranks of the saved run (any dp size,
        any ZeRO stage): each slot's full vectors are reassembled from the saved ranges and re-cut here."""
        steps = {}
        for slot_index, slot in enumerate(self.slots):
            saved = sorted((s["slots"][slot_index] for s in shards), key=lambda s: s["index"])
            first = saved[0]
            if first["key"] != slot.key or first["names"] != list(slot.names):
                raise ValueError(
                    f"optimizer state slot {slot_index} holds {first['key']} with parameters {first['names'][:3]}..., "
                    f"this model has {slot.key} with {list(slot.names)[:3]}..."
                )
            layout = self._layout(slot)
            shapes = [list(s) for s in layout.shapes]
            if first["shapes"] != shapes:
                bad = next(i for i, (a, b) in enumerate(zip(first["shapes"], shapes, strict=True)) if a != b)
                raise ValueError(
                    f"optimizer state for {slot.names[bad]!r} has shape {first['shapes'][bad]}, "
                    f"the model has {shapes[bad]}"
                )
            if [s["index"] for s in saved] != list(range(first["parts"])):
                raise ValueError(f"optimizer state of {slot.key}: expected {first['parts']} shards, got {len(saved)}")
            full = {k: torch.cat([s[k] for s in saved])[: layout.numel] for k in _STATS}
            for name, offset, shape in layout.offsets():
                numel = math.prod(shape)
                self.load_parameter_state(name, {k: v[offset : offset + numel].view(shape) for k, v in full.items()})
                p = self._params[name]
                if "master" in self.state[p]:  # the model's narrower weight follows its loaded master
                    with torch.no_grad():
                        local_part(p).copy_(self.state[p]["master"])
            steps[slot.key] = int(first["step"])
        self.set_steps_taken(steps)
        scaler_state = shards[0].get("loss_scaler")
        if self.scaler is not None and scaler_state is not None:
            self.scaler.load_state_dict(scaler_state)
