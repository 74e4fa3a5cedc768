"""LoRA for tensor-parallel projections, by composition: the base layer is wrapped, never modified.

Column-parallel ``W [out/tp, in]``: ``A [r, in]`` is replicated, ``B [out/tp, r]`` is split like W, and
``W + s B A`` is exactly this rank's rows of the merged full weight. Row-parallel ``W [out, in/tp]``:
``A [r, in/tp]`` is split like W, ``B [out, r]`` is replicated, and ``B (A_i x_i)`` is added to the
partial sum before the all-reduce, so the sum over ranks is ``B A x``. The replicated factor only sees
this rank's part of the computation, so its gradient is marked partial and summed over tp ranks.

Merging ``W + s B A`` happens in one function, :func:`merged_lora_weight`, for the live model (inference,
:func:`merge_lora`) and for export (``convert/to_hf.py``) alike: in float32, cast once to ``W``'s dtype,
so a bf16 model gets the same merged weights whichever path folds them in.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scaling.core.nn import ColumnParallelLinear, LayoutInvariantDropout, ParamMeta, RowParallelLinear, set_param_meta
from scaling.core.nn.param_meta import InitMethod, init_zeros, local_slice_of_init

__all__ = ["LoRALinear", "merge_lora", "merged_lora_weight"]


def merged_lora_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + scale * B A`` in ``weight``'s dtype: ``W [out, in]``, ``A [r, in]``, ``B [out, r]``.

    Computed in float32 and rounded once: in bf16, ``B A`` rounded before the add would lose the small
    update twice (the product, then the sum), which is most of what a low-rank update is.
    """
    return (weight.float() + scale * (lora_b.float() @ lora_a.float())).to(weight.dtype)


def _kaiming_uniform(fan_in: int) -> InitMethod:
    bound = 1.0 / math.sqrt(fan_in)

    def init(tensor: torch.Tensor, generator: torch.Generator) -> None:
        with torch.no_grad():
            tensor.uniform_(-bound, bound, generator=generator)

    return init


class LoRALinear(nn.Module):
    _transparent_child = "base"  # the base weights keep their names (see ParallelModule canonical names)

    def __init__(
        self, base: ColumnParallelLinear | RowParallelLinear, rank: int, alpha: float, dropout: float, seed: int
    ) -> None:
        super().__init__()
        self.base = base
        self.scaling = alpha / rank
        topology = base.topology
        tp, tp_rank, device = topology.tp_size, topology.tp_rank, topology.device
        out_features, in_features = base.out_features, base.in_features
        column = isinstance(base, ColumnParallelLinear)
        a_split, b_split = (None, 0) if column else (1, None)
        a = local_slice_of_init(
            (rank, in_features), _kaiming_uniform(in_features), seed, a_split, tp_rank, tp, device=device
        )
        b = local_slice_of_init((out_features, rank), init_zeros, seed + 1, b_split, tp_rank, tp, device=device)
        self.lora_a, self.lora_b = nn.Parameter(a), nn.Parameter(b)
        replicated = self.lora_a if column else self.lora_b
        split, split_dim = (self.lora_b, 0) if column else (self.lora_a, 1)
        set_param_meta(split, ParamMeta(tp_split_dim=split_dim))
        set_param_meta(replicated, ParamMeta(partial_grad_over_tp=tp > 1))
        self.dropout = LayoutInvariantDropout(dropout)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.base.enter(x)
        out = self.base.project(inner)
        if not self.merged:
            update = nn.functional.linear(nn.functional.linear(self.dropout(inner), self.lora_a), self.lora_b)
            out = out + self.scaling * update
        return self.base.leave(out)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``s B A`` into the base weight (for export or faster inference); idempotent."""
        if not self.merged:
            weight = self.base.weight
            weight.copy_(merged_lora_weight(weight, self.lora_a, self.lora_b, self.scaling))
            self.merged = True


def merge_lora(module: nn.Module) -> int:
    """Merge every LoRA layer inside ``module``; returns how many were merged."""
    layers = [m for m in module.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.merge()
    return len(layers)
