"""Mistral presets for a plain PyTorch loop (``Mistral7b``: the v0.3 shape, no sliding window).

The same sharded model as ``scaling.llama`` (Mistral 7B is a Llama-class decoder with GQA and a larger
RoPE base); see ``scaling._preset_model.PresetModel`` for the options.
"""

from __future__ import annotations

from typing import Any

from scaling._preset_model import PresetModel
from scaling.transformer.presets import preset_architecture

__all__ = ["Mistral7b"]


class Mistral7b(PresetModel):
    def __init__(self, **options: Any) -> None:
        super().__init__(preset_architecture("mistral-7b"), **options)
