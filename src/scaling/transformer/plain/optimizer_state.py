"""A plain ``torch.optim`` Adam/AdamW, seen through the interface the checkpoint format saves and loads.

The checkpoint stores optimizer state per parameter, in layer files, full over data-parallel ranks
(``master``, ``exp_avg``, ``exp_avg_sq`` and the step), so it loads on any layout and ZeRO stage. Our
engine's optimizer speaks that interface itself; a user's ``torch.optim.AdamW`` over a preset model's
sharded parameters gets it from this adapter: its state tensors are DTensors shaped like the parameters,
so gathering and re-sharding are the same one-parameter-at-a-time operations as for the weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from scaling.core.zero.tensors import assign_full, gathered, is_sharded

__all__ = ["TorchOptimizerState"]

_ADAM_STATE = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class _Slot:
    key: str
    names: tuple[str, ...]


class TorchOptimizerState:
    """``optimizer``'s Adam state by the model's layout-free parameter names (``params``: name -> parameter).

    Only Adam-family optimizers (first and second moments and a step per parameter) are supported: the
    checkpoint format has no place for other state, and silently saving part of it would resume wrongly.
    """

    scaler = None  # fp16 loss scaling of a plain loop lives in scaling.training.Scaler, saved by the caller

    def __init__(self, optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter], zero_stage: int) -> None:
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise TypeError(
                f"model.save(optimizer=...) stores Adam/AdamW state; got {type(optimizer).__name__} "
                "(save its state_dict yourself)"
            )
        self.optimizer = optimizer
        self.zero_stage = zero_stage
        by_id = {id(p): name for name, p in params.items()}
        self._params = dict(params)
        slots = []
        for index, group in enumerate(optimizer.param_groups):
            names = []
            for p in group["params"]:
                if id(p) not in by_id:
                    raise ValueError(
                        f"parameter group {index} of the optimizer holds a parameter that is not the model's"
                    )
                names.append(by_id[id(p)])
            slots.append(_Slot(f"group{index}", tuple(names)))
        self.slots = slots
        self.sharded = any(is_sharded(p) for p in self._params.values())

    def _state(self, name: str) -> dict[str, torch.Tensor]:
        p = self._params[name]
        state: dict[str, torch.Tensor] = self.optimizer.state[p]
        if not state:  # no step yet: the state Adam would start from
            state["step"] = torch.zeros((), dtype=torch.float32)
            for key in _ADAM_STATE:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def steps_taken(self) -> dict[str, int]:
        return {slot.key: int(self._state(slot.names[0])["step"]) if slot.names else 0 for slot in self.slots}

    def set_steps_taken(self, steps: Mapping[str, int]) -> None:
        for slot in self.slots:
            for name in slot.names:
                self._state(name)["step"].fill_(float(steps.get(slot.key, 0)))

    def parameter_state(self, name: str) -> dict[str, torch.Tensor]:
        """``name``'s weight (the fp32 parameter is its own master) and moments, full over dp (collective)."""
        state = self._state(name)
        return {
            "master": gathered(self._params[name].detach()).float(),
            **{key: gathered(state[key]) for key in _ADAM_STATE},
        }

    def load_parameter_state(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        p = self._params[name]
        own = self._state(name)
        assign_full(p, state["master"].reshape(p.shape))
        for key in _ADAM_STATE:
            assign_full(own[key], state[key].reshape(p.shape))

    def reload_masters_from_params(self) -> None:
        """The parameters are the masters: nothing to reload."""
