"""Turn a built transformer layer into its finetuning form: wrap LoRA targets, add adapters, freeze the rest.

Used as ``ParallelModule(..., adapt=finetuning_adapter(config))`` so the layers are adapted before the
engine sets up gradient buckets: frozen parameters never get buckets or optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from scaling.core.nn import ColumnParallelLinear, RowParallelLinear
from scaling.core.nn.param_meta import init_normal, init_zeros, local_slice_of_init
from scaling.core.topology import Topology
from scaling.transformer.finetuning.config import FinetuningConfig
from scaling.transformer.finetuning.lora import LoRALinear

__all__ = ["BottleneckAdapter", "WithAdapter", "finetuning_adapter"]


class BottleneckAdapter(nn.Module):
    """h + up(gelu(down(h))), replicated over tp ranks (tiny), up initialised to zero (starts as identity)."""

    def __init__(self, hidden: int, bottleneck: int, topology: Topology, seed: int) -> None:
        super().__init__()
        device = topology.device
        self.down = nn.Parameter(
            local_slice_of_init((bottleneck, hidden), init_normal(0.02), seed, None, 0, 1, device=device)
        )
        self.up = nn.Parameter(
            local_slice_of_init((hidden, bottleneck), init_zeros, seed + 1, None, 0, 1, device=device)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + nn.functional.gelu(h @ self.down.t()) @ self.up.t()


class WithAdapter(nn.Module):
    def __init__(self, inner: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.inner = inner
        self.adapter = adapter

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.inner(*args))  # type: ignore[no-any-return]


def _is_adapter_parameter(name: str) -> bool:
    return "lora_" in name or ".adapter." in name or name.startswith("adapter.")


def finetuning_adapter(config: FinetuningConfig, topology: Topology) -> Callable[[nn.Module, int], nn.Module]:
    """A function (layer, layer index) -> adapted layer, freezing everything that is not trained."""

    def adapt(layer: nn.Module, index: int) -> nn.Module:
        if config.lora is not None:
            lora = config.lora
            for parent in list(layer.modules()):
                for name, child in list(parent.named_children()):
                    if name in lora.targets and isinstance(child, ColumnParallelLinear | RowParallelLinear):
                        seed = 7_000_000 + 1000 * index + sum(map(ord, name))
                        setattr(parent, name, LoRALinear(child, lora.rank, lora.alpha, lora.dropout, seed))
        if config.adapters is not None:
            for name in ("attention", "mlp"):
                inner = getattr(layer, name, None)
                if isinstance(inner, nn.Module):
                    hidden = layer.config.hidden_size  # type: ignore[union-attr]
                    seed = 9_000_000 + 1000 * index + (0 if name == "attention" else 500)
                    adapter = BottleneckAdapter(hidden, config.adapters.bottleneck, topology, seed)  # type: ignore[arg-type]
                    setattr(layer, name, WithAdapter(inner, adapter))
        for name, param in layer.named_parameters():
            trainable = _is_adapter_parameter(name)
            trainable |= config.bitfit and name.endswith("bias")
            trainable |= config.train_norms and "norm" in name
            param.requires_grad_(trainable)
        return layer

    return adapt
