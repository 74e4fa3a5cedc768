"""The trained layers run for inference: incremental decoding with a pre-allocated, GQA-aware KV cache.

Training runs whole sequences through :class:`~scaling.transformer.model.layers.DecoderLayer`; generation
needs to feed one new token at a time and attend to everything before it. This module reuses the very
same projection, norm and MLP modules (so tensor-parallel ranks work unchanged and LoRA, BitFit and
adapters apply) and only replaces the attention core: keys and values are written into a cache of
``[layers, batch, kv_heads_local, max_slots, head_dim]`` and SDPA attends with ``enable_gqa`` so the
cached kv heads are never repeated in memory.

Sequences of different lengths are left-padded. Every call gets ``valid`` (which token slots hold real
tokens) and ``positions`` (each sequence's own RoPE positions), so padding shifts nothing: a padded
prompt produces exactly the logits it produces alone. A soft prompt, when the model has one, sits in
the first cache slots; callers never see it.
"""

from __future__ import annotations

import torch
from torch import nn

from scaling.core.nn import gather_from_tp
from scaling.transformer.finetuning.apply import WithAdapter, WithSoftPrompt
from scaling.transformer.inference.loading import LoadedModel
from scaling.transformer.model.attention import Attention
from scaling.transformer.model.layers import DecoderLayer, EmbeddingLayer, LMHead
from scaling.transformer.model.rope import rotary_tables

__all__ = ["InferenceModel", "KVCache"]


class KVCache:
    """Keys and values of every layer for ``max_slots`` positions, allocated once for a whole generation."""

    def __init__(
        self, layers: int, batch: int, kv_heads: int, max_slots: int, head_dim: int, dtype: torch.dtype,
        device: torch.device,
    ) -> None:  # fmt: skip
        shape = (layers, batch, kv_heads, max_slots, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_slots = max_slots

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` ``[b, kv, s, d]`` at slots ``start..start+s``; return the keys/values so far."""
        end = start + k.shape[2]
        if end > self.max_slots:
            raise ValueError(f"KV cache holds {self.max_slots} slots; writing up to slot {end}")
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


def _attention_mask(valid: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Boolean ``[b, 1, length, start + length]``: causal over slots, padding slots never attended.

    A padding query may still attend to itself: a row with nothing to attend to would give NaN, and NaN
    values in the cache would poison real rows through ``0 * NaN`` in the attention product.
    """
    slots = start + length
    query = torch.arange(start, slots, device=valid.device).unsqueeze(-1)  # [s, 1]
    key = torch.arange(slots, device=valid.device)  # [slots]
    causal = key <= query  # [s, slots]
    mask = causal & valid[:, None, :slots]  # [b, s, slots]
    mask |= key == query
    return mask.unsqueeze(1)


class InferenceModel:
    """Forward passes over this rank's layers, with or without a KV cache; logits gathered over tp."""

    def __init__(self, loaded: LoadedModel) -> None:
        module = loaded.module
        if module.topology.pp_size != 1:
            raise ValueError("InferenceModel needs every layer on this rank (pp=1)")
        layers = [module.layers[key] for key in sorted(module.layers.keys(), key=int)]
        first, *decoders, head = layers
        self.soft_prompt: torch.Tensor | None = None
        if isinstance(first, WithSoftPrompt):
            self.soft_prompt = first.soft_prompt
            first = first.inner
        assert isinstance(first, EmbeddingLayer) and isinstance(head, LMHead)
        assert all(isinstance(layer, DecoderLayer) for layer in decoders)
        self.embedding = first.embedding
        self.decoders: list[DecoderLayer] = decoders  # type: ignore[assignment]
        self.head = head
        self.loaded = loaded
        self.architecture = loaded.architecture
        self.tokenizer = loaded.tokenizer
        self.topology = module.topology
        self.device = self.topology.device
        self.dtype = head.weight.dtype
        self.vocab_size = loaded.architecture.vocab_size
        self.inv_freq = self.decoders[0].inv_freq if self.decoders else torch.zeros(0)

    @property
    def prefix_slots(self) -> int:
        """Cache slots taken by the soft prompt before the first token."""
        return 0 if self.soft_prompt is None else int(self.soft_prompt.shape[0])

    def new_cache(self, batch: int, max_tokens: int) -> KVCache:
        attention = _core(self.decoders[0].attention)
        return KVCache(
            len(self.decoders), batch, attention.kv_heads_local, self.prefix_slots + max_tokens,
            attention.head_dim, self.dtype, self.device,
        )  # fmt: skip

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
        if cache is None and start != 0:
            raise ValueError("without a KV cache the whole sequence must be given (start=0)")
        h = self.embedding(tokens).to(self.dtype)  # [b, s, hidden]
        n = self.prefix_slots
        if n:
            positions = positions + n
            valid = torch.cat([valid.new_ones(valid.shape[0], n), valid], dim=1)
            if start == 0:
                assert self.soft_prompt is not None
                prompt = self.soft_prompt.to(h.dtype).expand(h.shape[0], -1, -1)  # [b, n, hidden]
                prompt_positions = torch.arange(n, device=h.device).expand(h.shape[0], n)
                h, positions = torch.cat([prompt, h], 1), torch.cat([prompt_positions, positions], 1)
            else:
                start += n
        cos, sin = rotary_tables(positions, self.inv_freq)  # [b, s, rotary]
        mask = _attention_mask(valid.bool(), start, h.shape[1])
        for index, layer in enumerate(self.decoders):
            attention = _cached_attention(layer.attention, layer.attention_norm(h), cos, sin, mask, cache, index, start)
            h = h + attention
            h = h + layer.mlp(layer.mlp_norm(h))
        if n and start == 0:
            h = h[:, n:]
        out: torch.Tensor = self.head.norm(h)
        return out

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the real vocabulary (padding rows dropped) ``[..., vocab]``, in float32, on every rank."""
        local = nn.functional.linear(hidden, self.head.weight)  # [..., vocab / tp]
        full = gather_from_tp(local, self.topology.tp_group)  # [..., padded vocab]
        return full[..., : self.vocab_size].float()

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
        """Logits ``[b, s, vocab]`` (or ``[b, 1, vocab]`` with ``last_only``)."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        if valid is None:
            valid = torch.ones(tokens.shape[0], start + tokens.shape[1], dtype=torch.bool, device=tokens.device)
        hidden = self.hidden_states(tokens, positions, valid, cache, start)
        return self.logits(hidden[:, -1:] if last_only else hidden)


def _core(attention: nn.Module) -> Attention:
    inner = attention.inner if isinstance(attention, WithAdapter) else attention
    assert isinstance(inner, Attention)
    return inner


def _cached_attention(
    block: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    cache: KVCache | None,
    layer: int,
    start: int,
) -> torch.Tensor:
    """The attention block of a decoder layer (its adapter included), reading and filling the cache."""
    attention = _core(block)
    q, k, v = attention.project_qkv(x, cos, sin)  # [b, h_local, s, d], [b, kv_local, s, d] x2
    if cache is not None:
        k, v = cache.update(layer, k, v, start)  # [b, kv_local, start + s, d]
    out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # [b, h, s, d]
    result = attention.project_out(out)  # summed over tp ranks
    if isinstance(block, WithAdapter):
        result = block.adapter(result)
    return result
