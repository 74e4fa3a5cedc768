"""Norms whose weights are replicated over tp ranks and marked for sequence parallelism.

Under sequence parallelism each tp rank normalises only its ``seq / tp`` tokens, so the weight gradients
are partial sums; the engine adds them over tp ranks (``ParamMeta.partial_grad_over_tp``).
"""

from __future__ import annotations

import torch
from torch import nn

from scaling.core.nn.param_meta import ParamMeta, set_param_meta
from scaling.core.topology.topology import Topology

__all__ = ["LayerNorm", "RMSNorm"]


def _mark(param: torch.Tensor, topology: Topology) -> None:
    set_param_meta(param, ParamMeta(partial_grad_over_tp=topology.config.sequence_parallel and topology.tp_size > 1))


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * w``, computed in float32."""

    def __init__(self, dim: int, topology: Topology, *, eps: float = 1e-5, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=topology.device))
        _mark(self.weight, topology)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class LayerNorm(nn.Module):
    """``(x - mean) / std * w + b``, computed in float32."""

    def __init__(
        self, dim: int, topology: Topology, *, eps: float = 1e-5, bias: bool = True, dtype: torch.dtype = torch.float32
    ):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=topology.device))
        _mark(self.weight, topology)
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype, device=topology.device))
            _mark(self.bias, topology)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.float() if self.bias is not None else None
        out = nn.functional.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), bias, self.eps)
        return out.to(x.dtype)
