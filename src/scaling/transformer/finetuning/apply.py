"""Turn a built transformer layer into its finetuning form: wrap LoRA targets, add adapters, freeze the rest.

Used as ``ParallelModule(..., adapt=finetuning_adapter(config))`` so the layers are adapted before the
engine sets up gradient buckets: frozen parameters never get buckets or optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from scaling.core.config import ConfigError
from scaling.core.nn import ColumnParallelLinear, RowParallelLinear
from scaling.core.nn.param_meta import init_normal, init_zeros, local_slice_of_init
from scaling.core.topology import Topology
from scaling.transformer.finetuning.config import FinetuningConfig, LoRAConfig
from scaling.transformer.finetuning.lora import LoRALinear
from scaling.transformer.finetuning.targets import matches_target, no_match_message, unmatched_targets

__all__ = ["BottleneckAdapter", "WithAdapter", "WithSoftPrompt", "finetuning_adapter"]


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
    _transparent_child = "inner"

    def __init__(self, inner: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.inner = inner
        self.adapter = adapter

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.inner(*args))  # type: ignore[no-any-return]


class WithSoftPrompt(nn.Module):
    """Prepends ``tokens`` learned embeddings to the embedding layer's output.

    Positions shift by the prompt length (the prompt takes positions 0..n-1) and the activations carry
    ``soft_prompt_tokens`` so the LM head drops the prompt positions again: targets and loss masks of the
    batch are unchanged. The prompt is replicated over tp ranks; it is not supported with sequence
    parallelism (the embedding output is then split along the sequence).
    """

    _transparent_child = "inner"

    def __init__(self, inner: nn.Module, tokens: int, hidden: int, topology: Topology, seed: int) -> None:
        super().__init__()
        if topology.config.sequence_parallel and topology.tp_size > 1:
            raise ValueError("finetuning.soft_prompt is not supported with topology.sequence_parallel")
        self.inner = inner
        self.soft_prompt = nn.Parameter(
            local_slice_of_init((tokens, hidden), init_normal(0.02), seed, None, 0, 1, device=topology.device)
        )

    def __getattr__(self, name: str) -> Any:
        """Attributes of the wrapped embedding (the tied ``weight``) stay reachable through the wrapper."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = self.inner(batch)
        h, positions = out["h"], out["positions"]
        n = self.soft_prompt.shape[0]
        prompt = self.soft_prompt.to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1)  # [b, n, hidden]
        prompt_positions = torch.arange(n, device=positions.device).expand(positions.shape[0], n)
        out = {**out, "h": torch.cat([prompt, h], dim=1), "positions": torch.cat([prompt_positions, positions + n], 1)}
        if "document_ids" in out:
            ids = out["document_ids"]
            out["document_ids"] = torch.cat([ids[:, :1].expand(-1, n), ids], dim=1)  # the prompt joins document 0
        # The prompt length travels as a shape (known on the host: no device sync to read it back).
        out["soft_prompt_tokens"] = torch.zeros(h.shape[0], n, dtype=torch.bool, device=h.device)
        return out


def _is_adapter_parameter(name: str) -> bool:
    return "lora_" in name or ".adapter." in name or name.startswith("adapter.") or name.endswith("soft_prompt")


def _wrap_lora_targets(layer: nn.Module, index: int, lora: LoRAConfig) -> None:
    """Wrap every projection a target names; in a decoder layer, a target that names no module is an error."""
    found: list[str] = []
    for parent_name, parent in list(layer.named_modules()):
        for name, child in list(parent.named_children()):
            qualified = f"{parent_name}.{name}" if parent_name else name
            found.append(qualified)
            hit = any(matches_target(pattern, qualified) for pattern in lora.targets)
            if hit and isinstance(child, ColumnParallelLinear | RowParallelLinear):
                seed = 7_000_000 + 1000 * index + sum(map(ord, name))
                setattr(parent, name, LoRALinear(child, lora.rank, lora.alpha, lora.dropout, seed))
    if isinstance(getattr(layer, "attention", None), nn.Module):  # a decoder layer: every target must be here
        projections = [n for n, m in layer.named_modules() if isinstance(m, ColumnParallelLinear | RowParallelLinear)]
        for pattern in unmatched_targets(lora.targets, found)[:1]:
            raise ConfigError(f"finetuning.lora.targets: {no_match_message(pattern, projections or found)}")


def finetuning_adapter(config: FinetuningConfig, topology: Topology) -> Callable[[nn.Module, int], nn.Module]:
    """A function (layer, layer index) -> adapted layer, freezing everything that is not trained."""

    def adapt(layer: nn.Module, index: int) -> nn.Module:
        if config.lora is not None:
            _wrap_lora_targets(layer, index, config.lora)
        if config.adapters is not None:
            for name in ("attention", "mlp"):
                inner = getattr(layer, name, None)
                if isinstance(inner, nn.Module):
                    hidden = layer.config.hidden_size  # type: ignore[union-attr]
                    seed = 9_000_000 + 1000 * index + (0 if name == "attention" else 500)
                    adapter = BottleneckAdapter(hidden, config.adapters.bottleneck, topology, seed)  # type: ignore[arg-type]
                    setattr(layer, name, WithAdapter(inner, adapter))
        if config.soft_prompt is not None and index == 0:
            hidden = layer.embedding.embedding_dim  # type: ignore[union-attr]
            layer = WithSoftPrompt(layer, config.soft_prompt.tokens, hidden, topology, seed=8_000_000)  # type: ignore[arg-type]
        for name, param in layer.named_parameters():
            trainable = _is_adapter_parameter(name)
            trainable |= config.bitfit and name.endswith("bias")
            trainable |= config.train_norms and "norm" in name
            param.requires_grad_(trainable)
        return layer

    return adapt
