"""AdamW over a :class:`ParallelModule`: fp32 master weights, optional ZeRO-1, loss scaling, clipping.

One call of :meth:`Optimizer.step` after ``module.train_step``:

1. read the averaged gradients (``module.main_grad``, fp32 when reduced in fp32); with fp16 undo the
   loss scale;
2. with ZeRO, reduce-scatter the local gradient sums over data-parallel ranks straight into this rank's
   shards (the module's own all-reduce is switched off: half the gradient traffic);
3. compute the global gradient norm (each weight once over tp x pp, shards summed over dp); a non-finite
   norm (or a non-finite step loss, when the caller passes it) is an overflow, seen identically by every
   rank because the norm is reduced over every rank that holds a distinct part of it and the step loss
   is the same on every rank — the step is skipped (weights and Adam state untouched) and, with fp16,
   the loss scale lowered. Deciding it reads the norm and the loss to the host once: the step's only sync;
4. clip; set each group's learning rate from its schedule;
5. run ``torch.optim.AdamW`` on the fp32 master shards (the whole vector without ZeRO, ``1 / dp`` of it
   with ZeRO), then copy the masters back into the model (all-gathered over dp with ZeRO).

The update math is PyTorch's own AdamW applied to flat fp32 vectors, so a single process with
``torch.optim.AdamW`` is the exact reference.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from scaling.core.logging import get_logger
from scaling.core.optimizer.clipping import clip_grads_, global_grad_norm
from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.flat_shard import FlatShard
from scaling.core.optimizer.loss_scaler import DynamicLossScaler
from scaling.core.optimizer.lr_schedule import learning_rate_at
from scaling.core.optimizer.param_groups import ParamSlot, assign_groups, check_patterns, pattern_match_counts
from scaling.core.pipeline.module import ParallelModule

__all__ = ["Optimizer", "OptimizerStepResult"]

_logger = get_logger("scaling.optimizer")


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
        named = [(n, p) for n, p in module.named_parameters_canonical() if p.requires_grad]
        by_name = dict(named)
        names = [n for n, _ in named]
        counts = torch.tensor(pattern_match_counts(names, config.training_groups), dtype=torch.int64)
        if topology.pp_size > 1:  # each stage holds only its own layers: count matches over the pipeline
            counts = counts.to(topology.device)
            dist.all_reduce(counts, group=topology.pp_group)
        check_patterns(config.training_groups, counts.tolist())
        self.slots: list[ParamSlot] = assign_groups(names, config.training_groups)
        parts = topology.dp_size if config.zero else 1
        index = topology.dp_rank if config.zero else 0
        self.shards = [
            FlatShard([by_name[n] for n in slot.names], parts, index, topology.dp_group) for slot in self.slots
        ]
        groups: list[dict[str, Any]] = [
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
            # temporaries (sqrt, division) for the flat vector every step, which costs more than the update.
            fused=True,
        )
        dtypes = {p.dtype for _, p in named}
        self.scaler = (
            DynamicLossScaler(config.loss_scaler) if torch.float16 in dtypes and config.loss_scaler.enable else None
        )
        self._params = [p for _, p in named]
        self._counted = {id(p) for p in module.parameters_counted_in_norm()}
        self.sharded = config.zero and topology.dp_size > 1
        if self.sharded:
            module.grad_reducer.reduce = False  # reduce-scattered into the shards in step() instead

    @property
    def loss_scale(self) -> float:
        """Multiply the loss by this before backward (``module.train_step(..., loss_scale=...)``)."""
        return self.scaler.scale if self.scaler is not None else 1.0

    def step(self, step: int, loss: torch.Tensor | None = None) -> OptimizerStepResult:
        """Update the weights from the gradients of ``module.train_step``, or skip the update when the
        gradient norm or the step's ``loss`` (``StepResult.loss``, identical on every rank) is not finite."""
        grads = {id(p): self.module.main_grad(p) for p in self._params}
        if self.scaler is not None:
            inverse = 1.0 / self.scaler.scale
            for grad in grads.values():
                grad.mul_(inverse)
        topology = self.module.topology
        if self.sharded:
            for shard in self.shards:
                shard.reduce_scatter_grad(grads)
            squares = sum(
                (shard.squared_norm(self._counted) for shard in self.shards),
                torch.zeros((), device=topology.device),
            )
            dist.all_reduce(squares)  # shards over dp x weights over tp and pp: every rank of the world
            norm = squares.sqrt()
        else:
            counted = [grads[id(p)] for p in self._params if id(p) in self._counted]
            norm = global_grad_norm(counted, topology.model_group, topology.device)
        # The one host sync of the step: skip or not (the loss travels in the same copy).
        checked = [norm.float()] if loss is None else [norm.float(), loss.detach().float().to(norm.device)]
        values = torch.stack(checked).tolist()
        norm_value = values[0]
        overflow = not all(math.isfinite(v) for v in values)
        lrs = {slot.group.name: learning_rate_at(step, slot.group.learning_rate_schedule) for slot in self.slots}
        if overflow:
            for shard in self.shards:
                shard.master.grad = None
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
            if not self.sharded:
                shard.set_grad(grads)
        clipped = norm
        if self.config.gradient_clipping > 0:
            master_grads = [shard.master.grad for shard in self.shards if shard.master.grad is not None]
            clipped = clip_grads_(master_grads, self.config.gradient_clipping, norm)
        for slot, group in zip(self.slots, self.adam.param_groups[: len(self.slots)], strict=True):
            group["lr"] = lrs[slot.group.name]
        self.adam.step()
        for shard in self.shards:
            shard.master.grad = None
            shard.write_back()
        scale_used = self.loss_scale
        if self.scaler is not None:
            self.scaler.update(found_overflow=False)
        return OptimizerStepResult(norm, clipped, lrs, scale_used, grad_norm_value=norm_value)

    # State ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's shard: tensors plus the metadata to reload it on another data-parallel size."""
        slots = []
        for slot, shard in zip(self.slots, self.shards, strict=True):
            state = self.adam.state.get(shard.master, {})
            slots.append(
                {
                    "key": slot.key,
                    "names": list(slot.names),
                    "shapes": [list(p.shape) for p in shard.params],
                    "numel": shard.numel,
                    "parts": shard.parts,
                    "index": shard.index,
                    "range": [shard.start, shard.end],
                    "step": int(state["step"]) if "step" in state else 0,
                    "master": shard.master.detach().clone(),
                    "exp_avg": state["exp_avg"].clone() if "exp_avg" in state else torch.zeros_like(shard.master),
                    "exp_avg_sq": state["exp_avg_sq"].clone()
                    if "exp_avg_sq" in state
                    else torch.zeros_like(shard.master),
                }
            )
        return {"slots": slots, "loss_scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def parameter_states(self) -> dict[int, dict[str, torch.Tensor]]:
        """Per parameter (by id): its fp32 master, exp_avg and exp_avg_sq, shaped like this rank's parameter
        (all-gathered over data-parallel ranks when sharded; collective then). Layout-independent once the
        caller gathers tensor-parallel slices, which is how checkpoints store optimizer state.

        The tensors are views into the optimizer's own storage when unsharded: read them, do not keep them.
        """
        states: dict[int, dict[str, torch.Tensor]] = {}
        for shard in self.shards:
            state = self.adam.state.get(shard.master, {})
            vectors = {
                "master": shard.master.detach(),
                "exp_avg": state.get("exp_avg", torch.zeros_like(shard.master)),
                "exp_avg_sq": state.get("exp_avg_sq", torch.zeros_like(shard.master)),
            }
            full = {key: shard.gather(vector) for key, vector in vectors.items()}
            offset = 0
            for p in shard.params:
                states[id(p)] = {key: v[offset : offset + p.numel()].view_as(p) for key, v in full.items()}
                offset += p.numel()
        return states

    def steps_taken(self) -> dict[str, int]:
        """Adam's step count per slot key (updates applied, skipped steps excluded)."""
        return {
            slot.key: int(self.adam.state[shard.master]["step"]) if shard.master in self.adam.state else 0
            for slot, shard in zip(self.slots, self.shards, strict=True)
        }

    def load_parameter_states(self, states: dict[int, dict[str, torch.Tensor]], steps: dict[str, int]) -> None:
        """Inverse of :meth:`parameter_states` (+ :meth:`steps_taken`): each rank copies in its share.

        The model's own weights are not touched: they were saved from these masters and loaded already.
        """
        for slot, shard in zip(self.slots, self.shards, strict=True):
            moments = {key: torch.zeros_like(shard.master) for key in ("exp_avg", "exp_avg_sq")}
            with torch.no_grad():
                shard.master.zero_()
                targets = {"master": shard.master, **moments}
                for piece in shard.pieces:
                    at = piece.flat_start + piece.lo - shard.start
                    for key, target in targets.items():
                        source = states[id(piece.param)][key].reshape(-1)[piece.lo : piece.hi]
                        target[at : at + piece.hi - piece.lo].copy_(source)
            self.adam.state[shard.master] = {"step": torch.tensor(float(steps.get(slot.key, 0))), **moments}

    def load_state_dict(self, shards: list[dict[str, Any]]) -> None:
        """Load from the state dicts of *all* data-parallel ranks of the saved run (any dp size, any ZeRO
        setting): each slot's full vectors are reassembled from the saved ranges and re-cut for this rank."""
        for slot_index, (slot, shard) in enumerate(zip(self.slots, self.shards, strict=True)):
            saved = sorted((s["slots"][slot_index] for s in shards), key=lambda s: s["index"])
            first = saved[0]
            if first["key"] != slot.key or first["names"] != list(slot.names):
                raise ValueError(
                    f"optimizer state slot {slot_index} holds {first['key']} with parameters {first['names'][:3]}..., "
                    f"this model has {slot.key} with {list(slot.names)[:3]}..."
                )
            shapes = [list(p.shape) for p in shard.params]
            if first["shapes"] != shapes:
                bad = next(i for i, (a, b) in enumerate(zip(first["shapes"], shapes, strict=True)) if a != b)
                raise ValueError(
                    f"optimizer state for {slot.names[bad]!r} has shape {first['shapes'][bad]}, "
                    f"the model has {shapes[bad]}"
                )
            if [s["index"] for s in saved] != list(range(first["parts"])):
                raise ValueError(f"optimizer state of {slot.key}: expected {first['parts']} shards, got {len(saved)}")
            full = {
                k: shard.local_share(torch.cat([s[k] for s in saved])[: shard.numel].to(shard.master.device))
                for k in ("master", "exp_avg", "exp_avg_sq")
            }
            with torch.no_grad():
                shard.master.copy_(full["master"])
            self.adam.state[shard.master] = {
                "step": torch.tensor(float(first["step"])),
                "exp_avg": full["exp_avg"],
                "exp_avg_sq": full["exp_avg_sq"],
            }
            shard.write_back()
        scaler_state = shards[0].get("loss_scaler")
        if self.scaler is not None and scaler_state is not None:
            self.scaler.load_state_dict(scaler_state)
