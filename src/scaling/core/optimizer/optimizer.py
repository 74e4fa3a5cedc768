"""AdamW over a :class:`ParallelModule` at any ZeRO stage: fp32 masters, loss scaling, clipping, schedules.

One call of :meth:`Optimizer.step` after ``module.train_step``:

1. read the final gradients through the module's gradient sync (``module.main_grad(name)``: the
   data-parallel mean, fp32 when reduced in fp32; this rank's shard under ZeRO 1-3); with fp16 undo the
   loss scale;
2. compute the global gradient norm (each weight once over tp x pp, and shards summed over dp); a
   non-finite norm (or a non-finite step loss, when the caller passes it) is an overflow, seen identically
   by every rank because the norm is reduced over every rank that holds a distinct part of it and the step
   loss is the same on every rank — the step is skipped (weights and Adam state untouched) and, with fp16,
   the loss scale lowered. Deciding it reads the norm and the loss to the host once: the step's only sync;
3. clip; set each group's learning rate from its schedule;
4. run ``torch.optim.AdamW`` on the fp32 masters:
   * stage 0: one flat fp32 vector per parameter slot (fp32 parameters are views of it; narrower ones are
     copied back after the update);
   * stages 1-3: the module's parameters themselves, which FSDP2 keeps as fp32 shards (``DTensor``), so
     Adam's states are sharded like them and nothing is copied back.

The update math is PyTorch's own AdamW, so a single process with ``torch.optim.AdamW`` is the exact
reference at every stage.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from scaling.core.config import ConfigError
from scaling.core.logging import get_logger
from scaling.core.optimizer.clipping import clip_grads_, global_grad_norm
from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.flat_shard import FlatShard, SlotLayout
from scaling.core.optimizer.loss_scaler import DynamicLossScaler
from scaling.core.optimizer.lr_schedule import learning_rate_at
from scaling.core.optimizer.param_groups import ParamSlot, assign_groups, check_patterns, pattern_match_counts
from scaling.core.pipeline.module import ParallelModule
from scaling.core.zero.tensors import assign_full, gathered, local_part

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


class Optimizer:
    def __init__(self, module: ParallelModule, config: OptimizerConfig) -> None:
        self.module = module
        self.config = config
        topology = module.topology
        if config.zero_stage != module.sharding.stage:
            raise ConfigError(
                f"optimizer.zero_stage is {config.zero_stage} but the model was built for stage "
                f"{module.sharding.stage}; build it with ParallelModule(..., sharding=config.sharding)"
            )
        named = [(n, p) for n, p in module.named_parameters_canonical() if p.requires_grad]
        by_name = dict(named)
        names = [n for n, _ in named]
        counts = torch.tensor(pattern_match_counts(names, config.training_groups), dtype=torch.int64)
        if topology.pp_size > 1:  # each stage holds only its own layers: count matches over the pipeline
            counts = counts.to(topology.device)
            dist.all_reduce(counts, group=topology.pp_group)
        check_patterns(config.training_groups, counts.tolist())
        self.slots: list[ParamSlot] = assign_groups(names, config.training_groups)
        self.sharded = module.sharding.sharded
        self.shards: list[FlatShard] = []
        groups: list[dict[str, Any]]
        if self.sharded:
            groups = [
                {"params": [by_name[n] for n in slot.names], "weight_decay": slot.weight_decay, "lr": 0.0}
                for slot in self.slots
            ]
        else:
            self.shards = [FlatShard(slot.names, [by_name[n] for n in slot.names]) for slot in self.slots]
            groups = [
                {"params": [shard.master], "weight_decay": slot.weight_decay, "lr": 0.0}
                for slot, shard in zip(self.slots, self.shards, strict=True)
            ]
        if not groups:  # a stage without trainable parameters (e.g. finetuning only the first stage)
            groups = [{"params": [nn.Parameter(torch.zeros(0, device=topology.device))], "lr": 0.0}]
        self.adam = torch.optim.AdamW(
            groups,
            betas=(config.beta1, config.beta2),
            eps=config.eps,
            # One kernel reads and writes each state element once. The unfused path allocates full-size
            # temporaries (sqrt, division) for every parameter every step, which costs more than the update.
            fused=True,
        )
        self.scaler = (
            DynamicLossScaler(config.loss_scaler)
            if module.dtype == torch.float16 and config.loss_scaler.enable
            else None
        )
        self._names = names
        self._counted = set(module.names_counted_in_norm())

    @property
    def loss_scale(self) -> float:
        """Multiply the loss by this before backward (``module.train_step(..., loss_scale=...)``)."""
        return self.scaler.scale if self.scaler is not None else 1.0

    def _grads(self) -> dict[str, torch.Tensor | None]:
        grads = {name: self.module.main_grad(name) for name in self._names}
        if self.sharded:  # a parameter no micro-batch reached updates with a zero gradient, as at stage 0
            params = self.module.named_parameters_by_name()
            for name, grad in grads.items():
                if grad is None:
                    p = params[name]
                    p.grad = torch.zeros_like(p)
                    grads[name] = local_part(p.grad)
        return grads

    def step(self, step: int, loss: torch.Tensor | None = None) -> OptimizerStepResult:
        """Update the weights from the gradients of ``module.train_step``, or skip the update when the
        gradient norm or the step's ``loss`` (``StepResult.loss``, identical on every rank) is not finite."""
        grads = self._grads()
        present = [g for g in grads.values() if g is not None]
        if self.scaler is not None and present:
            torch._foreach_mul_(present, 1.0 / self.scaler.scale)
        topology = self.module.topology
        counted = [g for name, g in grads.items() if g is not None and name in self._counted]
        if self.sharded:  # shards over dp x weights over tp and pp: every rank of the world holds a part
            norm = global_grad_norm(counted, dist.group.WORLD, topology.device)
        else:
            norm = global_grad_norm(counted, topology.model_group, topology.device)
        # The one host sync of the step: skip or not (the loss travels in the same copy).
        checked = [norm.float()] if loss is None else [norm.float(), loss.detach().float().to(norm.device)]
        values = torch.stack(checked).tolist()
        norm_value = values[0]
        overflow = not all(math.isfinite(v) for v in values)
        lrs = {slot.group.name: learning_rate_at(step, slot.group.learning_rate_schedule) for slot in self.slots}
        if overflow:
            self._drop_grads()
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
                norm, norm, lrs, scale_before, skipped=True, grad_norm_value=norm_value, loss_scale_exhausted=exhausted
            )
        for shard in self.shards:
            shard.set_grad(grads)
        clipped = norm
        if self.config.gradient_clipping > 0:
            targets = [s.master.grad for s in self.shards if s.master.grad is not None] if self.shards else present
            clipped = clip_grads_(targets, self.config.gradient_clipping, norm)
        for slot, group in zip(self.slots, self.adam.param_groups[: len(self.slots)], strict=True):
            group["lr"] = lrs[slot.group.name]
        self.adam.step()
        self._drop_grads()
        for shard in self.shards:
            shard.write_back()
        scale_used = self.loss_scale
        if self.scaler is not None:
            self.scaler.update(found_overflow=False)
        return OptimizerStepResult(norm, clipped, lrs, scale_used, grad_norm_value=norm_value)

    def _drop_grads(self) -> None:
        for shard in self.shards:
            shard.master.grad = None
        if self.sharded:
            for p in self.module.named_parameters_by_name().values():
                p.grad = None

    # Per-parameter state, the checkpoint's view -------------------------------------------------------
    def _slot_of(self, name: str) -> int:
        return next(i for i, slot in enumerate(self.slots) if name in slot.names)

    def parameter_state(self, name: str) -> dict[str, torch.Tensor]:
        """Parameter ``name``'s fp32 master, exp_avg and exp_avg_sq, shaped like this rank's tensor-parallel
        slice and full over data-parallel ranks (gathered when sharded: collective over dp, so every dp rank
        asks for the same names in the same order). One parameter at a time: a checkpoint of a sharded
        model never holds more than one gathered parameter.

        At stage 0 the tensors are views into the optimizer's own storage: read them, do not keep them.
        """
        if self.sharded:
            p = self.module.named_parameters_by_name()[name]
            state = self.adam.state.get(p, {})
            zeros = torch.zeros_like(p)
            return {
                "master": gathered(p.detach()),
                "exp_avg": gathered(state.get("exp_avg", zeros)),
                "exp_avg_sq": gathered(state.get("exp_avg_sq", zeros)),
            }
        shard = self.shards[self._slot_of(name)]
        state = self.adam.state.get(shard.master, {})
        vectors = {
            "master": shard.master.detach(),
            "exp_avg": state.get("exp_avg", torch.zeros_like(shard.master)),
            "exp_avg_sq": state.get("exp_avg_sq", torch.zeros_like(shard.master)),
        }
        return {key: shard.view(vector, name) for key, vector in vectors.items()}

    def steps_taken(self) -> dict[str, int]:
        """Adam's step count per slot key (updates applied, skipped steps excluded)."""
        steps = {}
        for index, slot in enumerate(self.slots):
            state = self.adam.state.get(self._state_key(index), {})
            steps[slot.key] = int(state["step"]) if "step" in state else 0
        return steps

    def _state_key(self, slot_index: int) -> torch.Tensor:
        """The tensor Adam keeps a slot's step count under (its flat master, or its first parameter)."""
        if self.sharded:
            return self.module.named_parameters_by_name()[self.slots[slot_index].names[0]]
        return self.shards[slot_index].master

    def load_parameter_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`parameter_state`: copy this rank's share of ``state`` (full over dp) in.

        The model's own weights are taken from the checkpoint's model files, not from here, except under
        ZeRO 1-3, where the parameters *are* the masters.
        """
        if self.sharded:
            p = self.module.named_parameters_by_name()[name]
            current = self.adam.state.setdefault(p, {})
            with torch.no_grad():
                assign_full(p, state["master"])
                for key in ("exp_avg", "exp_avg_sq"):
                    if key not in current:
                        current[key] = torch.zeros_like(p)
                    assign_full(current[key], state[key])
            return
        shard = self.shards[self._slot_of(name)]
        current = self.adam.state.setdefault(shard.master, {})
        with torch.no_grad():
            for key in ("exp_avg", "exp_avg_sq"):
                if key not in current:
                    current[key] = torch.zeros_like(shard.master)
            for key, target in (
                ("master", shard.master),
                ("exp_avg", current["exp_avg"]),
                ("exp_avg_sq", current["exp_avg_sq"]),
            ):
                view = shard.view(target, name)
                view.copy_(state[key].reshape(view.shape))

    def set_steps_taken(self, steps: dict[str, int]) -> None:
        """Adam's step count per slot key, as :meth:`steps_taken` returned it."""
        for index, slot in enumerate(self.slots):
            key = self._state_key(index)
            for p in [key] if not self.sharded else [self.module.named_parameters_by_name()[n] for n in slot.names]:
                state = self.adam.state.setdefault(p, {})
                state["step"] = torch.tensor(float(steps.get(slot.key, 0)), device=local_part(p).device)
                for stat in ("exp_avg", "exp_avg_sq"):
                    state.setdefault(stat, torch.zeros_like(p))

    def reload_masters_from_params(self) -> None:
        """After the model's weights were loaded without optimizer state: masters follow the weights."""
        for shard in self.shards:
            shard.load_from_params()

    # In-memory state dicts (any stage, any data-parallel size) ---------------------------------------
    def _layout(self, slot_index: int) -> SlotLayout:
        slot = self.slots[slot_index]
        params = self.module.named_parameters_by_name()
        shapes = tuple(tuple(params[n].shape) for n in slot.names)  # a DTensor's shape is full over dp
        topology = self.module.topology
        parts, index = (topology.dp_size, topology.dp_rank) if self.sharded else (1, 0)
        return SlotLayout(tuple(slot.names), shapes, parts, index)

    def state_dict(self) -> dict[str, Any]:
        """This rank's share of each slot's flat vectors, plus what is needed to cut them anew for another
        data-parallel size or ZeRO stage. Under ZeRO 1-3 this gathers one slot at a time (collective)."""
        slots = []
        steps = self.steps_taken()
        for index, slot in enumerate(self.slots):
            layout = self._layout(index)
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

    def load_state_dict(self, shards: list[dict[str, Any]]) -> None:
        """Load from the state dicts of *all* data-parallel ranks of the saved run (any dp size, any ZeRO
        stage): each slot's full vectors are reassembled from the saved ranges and re-cut for this rank."""
        steps = {}
        for slot_index, slot in enumerate(self.slots):
            saved = sorted((s["slots"][slot_index] for s in shards), key=lambda s: s["index"])
            first = saved[0]
            if first["key"] != slot.key or first["names"] != list(slot.names):
                raise ValueError(
                    f"optimizer state slot {slot_index} holds {first['key']} with parameters {first['names'][:3]}..., "
                    f"this model has {slot.key} with {list(slot.names)[:3]}..."
                )
            layout = self._layout(slot_index)
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
            steps[slot.key] = int(first["step"])
        self.set_steps_taken(steps)
        for shard in self.shards:  # stage 0: the model's weights follow the loaded masters
            shard.write_back()
        scaler_state = shards[0].get("loss_scaler")
        if self.scaler is not None and scaler_state is not None:
            self.scaler.load_state_dict(scaler_state)
