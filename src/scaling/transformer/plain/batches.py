"""The batches a plain loop may pass to ``model(batch)``: ours, or a Hugging Face-style dict.

Ours is what the datasets and ``scaling.loaders`` produce: ``tokens``, ``targets`` (the next token of each
position), ``loss_mask`` (which targets count) and ``positions`` (+ ``document_ids`` for packed rows).
A Hugging Face batch has ``input_ids``, ``attention_mask`` and ``labels`` aligned with the inputs (the
model shifts them; -100 marks positions without loss). Both become ours here, once, on the model's device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["IGNORE_INDEX", "normalise_batch"]

IGNORE_INDEX = -100  # Hugging Face's label for "no loss here"


def _from_huggingface(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    input_ids = torch.as_tensor(batch["input_ids"])
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, sequence], got shape {tuple(input_ids.shape)}")
    out: dict[str, torch.Tensor] = {"tokens": input_ids}
    attention = batch.get("attention_mask")
    if attention is not None:
        attention = torch.as_tensor(attention).to(torch.int64)
        if attention.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention.shape)}, input_ids {tuple(input_ids.shape)}")
        # Positions count real tokens only (left padding shifts nothing); padding is its own "document",
        # so no real token attends to it, wherever it sits.
        out["positions"] = (attention.cumsum(dim=1) - 1).clamp(min=0)
        if not bool(attention.all()):
            out["document_ids"] = attention
    labels = batch.get("labels")
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels has shape {tuple(labels.shape)}, input_ids {tuple(input_ids.shape)}")
        # Position i predicts labels[i + 1]; the last position predicts nothing.
        shifted = torch.full_like(labels, IGNORE_INDEX)
        shifted[:, :-1] = labels[:, 1:]
        keep = shifted != IGNORE_INDEX
        out["targets"] = torch.where(keep, shifted, torch.zeros_like(shifted))
        out["loss_mask"] = keep.float()
    return out


def normalise_batch(batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """``batch`` in our keys, on ``device``; raises ValueError naming what is missing or mis-shaped."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"a batch is a dict of tensors, got {type(batch).__name__}")
    if "input_ids" in batch:
        converted = _from_huggingface(batch)
    elif "tokens" in batch:
        converted = {key: torch.as_tensor(value) for key, value in batch.items() if isinstance(value, torch.Tensor)}
    else:
        raise ValueError(
            f"a batch needs 'tokens' (scaling.loaders) or 'input_ids' (Hugging Face); it has {sorted(batch) or 'none'}"
        )
    tokens = converted["tokens"]
    if "positions" not in converted:
        converted["positions"] = torch.arange(tokens.shape[1]).expand_as(tokens)
    return {key: value.to(device, non_blocking=True) for key, value in converted.items()}
