"""The trained model run for inference: a thin driver over :class:`~scaling.transformer.model.Transformer`.

Generation feeds one new token at a time and attends to everything before it. The model's own forward
does that when the batch carries a KV cache (see :mod:`scaling.transformer.model.transformer`), so this
module adds no layer logic of its own: it wraps the loaded layers (LoRA merged, adapters and soft prompt
in place, this rank's tensor-parallel shards) in a ``Transformer``, builds the inference batch, and
gathers the logits over the tensor-parallel ranks.

Sequences of different lengths are left-padded. Every call gets ``valid`` (which token slots hold real
tokens) and ``positions`` (each sequence's own RoPE positions), so padding shifts nothing: a padded
prompt produces exactly the logits it produces alone. A soft prompt, when the model has one, sits in
the first cache slots; callers never see it.
"""

from __future__ import annotations

from typing import Any

import torch

from scaling.core.nn import gather_from_tp
from scaling.transformer.inference.loading import LoadedModel
from scaling.transformer.model.attention import KVCache
from scaling.transformer.model.transformer import Transformer

__all__ = ["InferenceModel", "KVCache"]


class InferenceModel:
    """Forward passes over this rank's layers, with or without a KV cache; logits gathered over tp."""

    def __init__(self, loaded: LoadedModel) -> None:
        module = loaded.module
        if module.topology.pp_size != 1:
            raise ValueError("InferenceModel needs every layer on this rank (pp=1)")
        layers = [module.layers[key] for key in sorted(module.layers.keys(), key=int)]
        self.model = Transformer(loaded.architecture, module.topology, layers=layers).eval()
        self.loaded = loaded
        self.architecture = loaded.architecture
        self.tokenizer = loaded.tokenizer
        self.topology = module.topology
        self.device = self.topology.device
        self.dtype = self.model.head.weight.dtype
        self.vocab_size = loaded.architecture.vocab_size

    @property
    def prefix_slots(self) -> int:
        """Cache slots taken by the soft prompt before the first token."""
        return self.model.prefix_slots

    def new_cache(self, batch: int, max_tokens: int) -> KVCache:
        return self.model.new_kv_cache(batch, max_tokens)

    @staticmethod
    def _batch(
        tokens: torch.Tensor,
        positions: torch.Tensor | None,
        valid: torch.Tensor | None,
        cache: KVCache | None,
        start: int,
    ) -> dict[str, Any]:
        if positions is None:
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand_as(tokens)
        if valid is None:
            valid = torch.ones(tokens.shape[0], start + tokens.shape[1], dtype=torch.bool, device=tokens.device)
        batch: dict[str, Any] = {"tokens": tokens, "positions": positions, "valid": valid, "cache_start": start}
        if cache is not None:
            batch["kv_cache"] = cache
        return batch

    @torch.inference_mode()
    def hidden_states(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Final-norm hidden states ``[b, s, hidden]`` of ``tokens`` ``[b, s]`` at token slots ``start..``.

        ``positions`` ``[b, s]``: RoPE positions of the tokens; ``valid`` ``[b, start + s]``: which token
        slots so far hold real tokens. Without a cache ``start`` must be 0 (the whole sequence is given).
        """
        return self.model.hidden_states(self._batch(tokens, positions, valid, cache, start))

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits ``[b, s, vocab]`` (or ``[b, 1, vocab]`` with ``last_only``) over the real vocabulary, fp32."""
        batch = self._batch(tokens, positions, valid, cache, start)
        local = self.model(batch, last_only=last_only).logits  # [b, s, vocab / tp]
        full = gather_from_tp(local, self.topology.tp_group)  # [b, s, padded vocab], the same on every rank
        return full[..., : self.vocab_size].float()
