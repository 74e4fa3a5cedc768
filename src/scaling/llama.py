"""Llama presets for a plain PyTorch loop: ``Llama70b(zero_stage=3, precision="bf16")`` and its siblings.

Each class is a sharded model (``scaling.transformer.plain.model.ShardedTransformer``): its parameters are
the ZeRO-sharded fp32 masters, so ``torch.optim.AdamW(model.parameters())`` is a sharded optimizer, and
``loss = model(batch); loss.backward()`` is the whole data-parallel step. Sizes: ``"7b"``, ``"13b"``,
``"70b"`` (Llama 2), ``"3-8b"``, ``"3-70b"`` (Llama 3), ``"tiny"`` (for CPU), or any
``TransformerArchitectureConfig``.
"""

from __future__ import annotations

from typing import Any

from scaling._preset_model import PresetModel
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.presets import llama_architecture

__all__ = ["Llama", "Llama3_8b", "Llama3_70b", "Llama7b", "Llama13b", "Llama70b", "LlamaTiny"]


class Llama(PresetModel):
    """``Llama(size | architecture, *, zero_stage=3, precision="bf16", fast_attn=False, tp=1, offload=False,
    activation_checkpointing=False, pretrained=None, seed=0)``; see ``PresetModel`` for every option."""

    def __init__(self, size: str | TransformerArchitectureConfig = "7b", **options: Any) -> None:
        architecture = size if isinstance(size, TransformerArchitectureConfig) else llama_architecture(size)
        super().__init__(architecture, **options)


class Llama7b(Llama):
    def __init__(self, **options: Any) -> None:
        super().__init__("7b", **options)


class Llama13b(Llama):
    def __init__(self, **options: Any) -> None:
        super().__init__("13b", **options)


class Llama70b(Llama):
    def __init__(self, **options: Any) -> None:
        super().__init__("70b", **options)


class Llama3_8b(Llama):
    def __init__(self, **options: Any) -> None:
        super().__init__("3-8b", **options)


class Llama3_70b(Llama):
    def __init__(self, **options: Any) -> None:
        super().__init__("3-70b", **options)


class LlamaTiny(Llama):
    """A few hundred thousand parameters: the loop, the tests and the examples on CPU."""

    def __init__(self, **options: Any) -> None:
        super().__init__("tiny", **options)
