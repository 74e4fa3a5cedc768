"""``Transformer``: the whole decoder as one plain ``nn.Module``, for training and for incremental decoding.

The same layer objects the pipeline engine runs (embedding, decoder layers, final norm and LM head, see
``layers.py``), chained in one ``forward``. On ``Topology.single()`` it needs no process group: build it,
call it on a batch, ``loss.backward()``, step any ``torch.optim`` optimizer. Its parameter names are the
engine's layout-free names (``layers.{index}.{key}``), so a checkpoint's tensors map onto it one to one.

The RoPE tables and the attention mask are computed once per forward, after the embedding (a soft prompt
shifts positions there), and travel to every decoder layer in the activations.

Inference uses this same forward. A batch with ``valid`` (which token slots hold real tokens: left
padding) and optionally ``kv_cache`` + ``cache_start`` decodes incrementally: each decoder layer writes
its keys and values into the cache and attends to every slot so far. A soft prompt, when the first layer
prepends one, fills the first cache slots in the call with ``cache_start`` 0; later calls drop it from
their activations, since the cache already holds it. Callers never see it: ``positions``, ``valid`` and
``cache_start`` count tokens only. The inference mask is causal and padding-aware; ``document_ids`` play
no part in it (one sequence per row).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from scaling.core.nn.dropout import DropoutKey, dropout_key
from scaling.core.pipeline.layer_spec import TiedLayerSpec
from scaling.core.topology import Topology
from scaling.transformer.model.attention import CacheSlots, KVCache, kv_heads_per_rank, padding_mask
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.model.layers import (
    Activations,
    LanguageModelLoss,
    LMHead,
    attention_tables,
    transformer_layer_specs,
)

__all__ = ["Transformer", "TransformerOutput"]

_PROMPT = "soft_prompt_tokens"  # set by a first layer that prepends learned positions (finetuning)


class TransformerOutput(dict[str, Any]):
    """``logits`` ([b, s, vocab / tp]) and, when the batch had ``targets``, ``loss`` and ``loss_tokens``."""

    @property
    def logits(self) -> torch.Tensor:
        value: torch.Tensor = self["logits"]
        return value

    @property
    def loss(self) -> torch.Tensor:
        value: torch.Tensor = self["loss"]
        return value


class Transformer(nn.Module):
    """The decoder on one rank of tensor parallelism (or on one process with ``Topology.single()``).

    ``forward(batch)`` takes ``{"tokens": [b, s]}`` (plus ``positions``, ``document_ids``, ``targets``,
    ``loss_mask`` as the datasets produce them) and returns a :class:`TransformerOutput`. Dropout masks are
    keyed by ``(seed, step, micro_batch, layer)`` exactly as the engine keys them, so with the same seed and
    step this module computes what ``ParallelModule`` computes on the (1, 1, 1) layout.

    ``layers`` wraps already built layers instead of building them (inference runs a loaded, adapted
    ``ParallelModule``'s layers through this forward; they are shared, not copied).
    """

    def __init__(
        self,
        config: TransformerArchitectureConfig,
        topology: Topology | None = None,
        *,
        seed: int = 0,
        layers: Sequence[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.topology = topology or Topology.single()
        if self.topology.pp_size != 1:
            raise ValueError(
                f"Transformer holds the whole model; pipe_parallel_size is {self.topology.pp_size} "
                "(the pipeline engine runs this rank's stages of the same layers)"
            )
        self.seed = seed
        self.loss_fn = LanguageModelLoss(self.topology)
        if layers is not None:
            if len(layers) != config.num_layers + 2:
                raise ValueError(f"{len(layers)} layers given; the architecture has {config.num_layers + 2}")
            self.layers = nn.ModuleList(layers)
            return
        specs = transformer_layer_specs(config, self.topology, seed=seed)
        self.layers = nn.ModuleList(spec.build() for spec in specs)
        tied = [i for i, spec in enumerate(specs) if isinstance(spec, TiedLayerSpec)]
        for index in tied[1:]:  # one Parameter for the embedding and the head, as on a single stage
            spec = specs[index]
            assert isinstance(spec, TiedLayerSpec)
            for attribute in spec.tied_weight_attributes:
                setattr(self.layers[index], attribute, getattr(self.layers[tied[0]], attribute))
        self.to(self.topology.device)

    @property
    def head(self) -> LMHead:
        head = self.layers[-1]
        assert isinstance(head, LMHead)
        return head

    @property
    def prefix_slots(self) -> int:
        """Positions a soft prompt prepends (0 without one): they take the first slots of a KV cache."""
        prompt = getattr(self.layers[0], "soft_prompt", None)
        return 0 if prompt is None else int(prompt.shape[0])

    def new_kv_cache(self, batch: int, max_tokens: int) -> KVCache:
        """A cache for ``max_tokens`` tokens per sequence (prompt and generated), plus the soft prompt."""
        config = self.config
        return KVCache(
            config.num_layers, batch, kv_heads_per_rank(config, self.topology.tp_size),
            self.prefix_slots + max_tokens, config.dims_per_head, self.head.weight.dtype, self.head.weight.device,
        )  # fmt: skip

    def forward(
        self, batch: dict[str, Any], *, step: int = 0, micro_batch: int = 0, last_only: bool = False
    ) -> TransformerOutput:
        """Logits, and the loss when ``batch`` has ``targets``; ``last_only``: logits of the last position only.

        Inference keys of ``batch`` (see the module docstring): ``valid`` ``[b, cache_start + s]``,
        ``kv_cache`` (a :class:`KVCache`) and ``cache_start`` (token slots already in the cache).
        """
        if last_only and "targets" in batch:
            raise ValueError("last_only computes one position's logits; the loss needs all of them")
        x = self.decode(batch, step=step, micro_batch=micro_batch)
        if last_only:  # the last position is always a token (a soft prompt comes first)
            x = {**{k: v for k, v in x.items() if k != _PROMPT}, "h": x["h"][:, -1:]}
        with dropout_key(DropoutKey(self.seed, step, micro_batch, len(self.layers) - 1)):
            logits = self.layers[-1](x)
        output = TransformerOutput(logits=logits)
        if "targets" in batch:
            loss, metrics = self.loss_fn(logits, batch)
            output["loss"] = loss
            output.update(metrics)
        return output

    def hidden_states(self, batch: dict[str, Any]) -> torch.Tensor:
        """The final norm's output ``[b, s, hidden]`` at the batch's token positions (what the head projects)."""
        return self.head.final_hidden(self.decode(batch))

    def decode(self, batch: dict[str, Any], *, step: int = 0, micro_batch: int = 0) -> Activations:
        """The activations after the last decoder layer (embedding and decoder layers; not the head)."""
        with dropout_key(DropoutKey(self.seed, step, micro_batch, 0)):
            x: Activations = self.layers[0](batch)
        x, cache, start = self._attention_inputs(x, batch)
        for index in range(1, len(self.layers) - 1):
            if start is not None:
                x = {**x, "kv_slots": CacheSlots(cache, index - 1, start)}
            with dropout_key(DropoutKey(self.seed, step, micro_batch, index)):
                x = self.layers[index](x)
        return x

    def _attention_inputs(
        self, x: Activations, batch: dict[str, Any]
    ) -> tuple[Activations, KVCache | None, int | None]:
        """``x`` with its RoPE tables and mask; for inference also the cache and this call's first slot."""
        inv_freq = self.layers[1].inv_freq  # the buffer each decoder layer would use itself
        assert isinstance(inv_freq, torch.Tensor)
        cache: KVCache | None = batch.get("kv_cache")
        if "valid" not in batch and cache is None:  # training and evaluation: the causal (document) mask
            return attention_tables(x, inv_freq), None, None
        start: int = batch.get("cache_start", 0)
        if cache is None and start != 0:
            raise ValueError("without a KV cache the whole sequence must be given (cache_start=0)")
        tokens = batch["tokens"]
        valid = batch.get("valid")
        if valid is None:
            valid = torch.ones(tokens.shape[0], start + tokens.shape[1], dtype=torch.bool, device=tokens.device)
        prefix = x[_PROMPT].shape[1] if _PROMPT in x else 0
        if prefix and start:  # the soft prompt is in the cache already: this call's activations drop it
            x = {k: v for k, v in x.items() if k != _PROMPT}
            x["h"], x["positions"] = x["h"][:, prefix:], x["positions"][:, prefix:]
        slot = prefix + start if start else 0  # the cache slot of this call's first position
        valid = torch.cat([valid.new_ones(valid.shape[0], prefix), valid], dim=1).bool()  # [b, prefix + ...]
        mask = padding_mask(valid, slot, x["h"].shape[1])  # [b, 1, s, slot + s]
        return attention_tables(x, inv_freq, mask), cache, slot
