"""The decoder as pipeline layers: embedding, pre-norm decoder layers, final norm + LM head, and the loss.

Activations between layers are the pytree ``{"h": [b, s, hidden], "positions": [b, s]}`` plus
``"document_ids"`` for packed sequences; under sequence parallelism ``h`` holds ``s / tp`` tokens.

A decoder layer needs RoPE tables and an attention mask. When the activations carry them (keys
``rope_cos``, ``rope_sin``, ``attention_mask``, see :func:`attention_tables`) every layer reads the same
tensors; :class:`~scaling.transformer.model.transformer.Transformer` computes them once per forward. A
layer given activations without them (a pipeline stage) computes its own and does not pass them on, so
what travels between stages stays the small pytree above. Inference adds ``kv_slots``
(:class:`~scaling.transformer.model.attention.CacheSlots`), which never crosses a stage.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scaling.core.nn import (
    ColumnParallelLinear,
    LayerNorm,
    LayoutInvariantDropout,
    ParamMeta,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
    all_gather_from_sp,
    copy_to_tp,
    set_param_meta,
    vocab_parallel_cross_entropy,
)
from scaling.core.nn.param_meta import init_normal, local_slice_of_init
from scaling.core.pipeline.layer_spec import LayerSpec, TiedLayerSpec
from scaling.core.topology import Topology
from scaling.transformer.model.attention import Attention, CacheSlots, attention_mask
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.model.rope import inverse_frequencies, rotary_tables

__all__ = [
    "DecoderLayer",
    "EmbeddingLayer",
    "LMHead",
    "LanguageModelLoss",
    "attention_tables",
    "loss_tokens",
    "transformer_layer_specs",
]

Activations = dict[str, Any]  # tensors, plus a CacheSlots under "kv_slots" during inference
_TABLES = ("rope_cos", "rope_sin", "attention_mask")


def attention_tables(x: Activations, inv_freq: torch.Tensor, mask: torch.Tensor | None = None) -> Activations:
    """``x`` with the RoPE tables of its positions and its attention mask, for every decoder layer to read.

    ``mask`` defaults to the training mask: causal, within documents when ``x`` has ``document_ids``.
    """
    positions = x["positions"]
    cos, sin = rotary_tables(positions, inv_freq)  # [b, s, rotary]
    if mask is None:
        mask = attention_mask(positions.shape[1], x.get("document_ids"), x["h"].device)
    return {**x, "rope_cos": cos, "rope_sin": sin, "attention_mask": mask}


def _norm(config: TransformerArchitectureConfig, topology: Topology) -> nn.Module:
    if config.norm_type == "rms":
        return RMSNorm(config.hidden_size, topology, eps=config.norm_eps)
    return LayerNorm(config.hidden_size, topology, eps=config.norm_eps, bias=config.norm_bias)


def _dropout(p: float, topology: Topology) -> LayoutInvariantDropout:
    """Dropout on the residual stream, which is split along the sequence under sequence parallelism."""
    if topology.config.sequence_parallel and topology.tp_size > 1:
        return LayoutInvariantDropout(p, split_dim=1, split_parts=topology.tp_size, split_index=topology.tp_rank)
    return LayoutInvariantDropout(p)


class EmbeddingLayer(nn.Module):
    """tokens [b, s] -> {"h": [b, s(/tp), hidden], "positions", ("document_ids")}."""

    def __init__(self, config: TransformerArchitectureConfig, topology: Topology, seed: int) -> None:
        super().__init__()
        vocab = config.padded_vocab_size
        self.embedding = VocabParallelEmbedding(vocab, config.hidden_size, topology, seed=seed)
        self.weight = self.embedding.weight  # the attribute tied to the LM head
        self.dropout = _dropout(config.embedding_dropout, topology)

    def forward(self, batch: dict[str, torch.Tensor]) -> Activations:
        tokens = batch["tokens"]
        positions = batch.get("positions")
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        out = {"h": self.dropout(self.embedding(tokens)), "positions": positions}
        if "document_ids" in batch:
            out["document_ids"] = batch["document_ids"]
        return out


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up are column-parallel, down row-parallel."""

    def __init__(self, config: TransformerArchitectureConfig, topology: Topology, seed: int) -> None:
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.mlp_size, config.mlp_bias
        self.gate = ColumnParallelLinear(hidden, inner, topology, bias=bias, seed=seed)
        self.up = ColumnParallelLinear(hidden, inner, topology, bias=bias, seed=seed + 2)
        self.down = RowParallelLinear(inner, hidden, topology, bias=bias, seed=seed + 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down(nn.functional.silu(self.gate(x)) * self.up(x))  # [b, s, inner / tp] inside
        return out


class GeluMLP(nn.Module):
    def __init__(self, config: TransformerArchitectureConfig, topology: Topology, seed: int) -> None:
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.mlp_size, config.mlp_bias
        self.up = ColumnParallelLinear(hidden, inner, topology, bias=bias, seed=seed)
        self.down = RowParallelLinear(inner, hidden, topology, bias=bias, seed=seed + 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down(nn.functional.gelu(self.up(x)))
        return out


class DecoderLayer(nn.Module):
    """Pre-norm: h + dropout(attention(norm(h))), then h + dropout(mlp(norm(h)))."""

    inv_freq: torch.Tensor

    def __init__(self, config: TransformerArchitectureConfig, topology: Topology, seed: int) -> None:
        super().__init__()
        self.config = config
        self.topology = topology
        self.attention_norm = _norm(config, topology)
        self.attention = Attention(config, topology, seed)
        self.mlp_norm = _norm(config, topology)
        self.mlp = (
            SwiGLU(config, topology, seed + 100)
            if config.mlp_type == "swiglu"
            else GeluMLP(config, topology, seed + 100)
        )
        self.attention_output_dropout = _dropout(config.attention_output_dropout, topology)
        self.mlp_dropout = _dropout(config.mlp_dropout, topology)
        self.register_buffer(
            "inv_freq", inverse_frequencies(config.rotary_dims, config.rope_base, config.rope_scaling), persistent=False
        )

    def forward(self, x: Activations) -> Activations:
        tables = x if _TABLES[0] in x else attention_tables(x, self.inv_freq)
        cos, sin, mask = (tables[key] for key in _TABLES)
        slots: CacheSlots | None = x.get("kv_slots")
        h = x["h"]
        # slots positionally: an adapter wrapping the attention block passes its arguments through as given
        h = h + self.attention_output_dropout(self.attention(self.attention_norm(h), cos, sin, mask, slots))
        h = h + self.mlp_dropout(self.mlp(self.mlp_norm(h)))
        return {**x, "h": h}


class LMHead(nn.Module):
    """final norm, then logits over this rank's vocabulary slice: [b, s, vocab / tp]."""

    def __init__(self, config: TransformerArchitectureConfig, topology: Topology, seed: int) -> None:
        super().__init__()
        self.topology = topology
        self.norm = _norm(config, topology)
        vocab = config.padded_vocab_size
        weight = local_slice_of_init(
            (vocab, config.hidden_size),
            init_normal(0.02),
            seed,
            0,
            topology.tp_rank,
            topology.tp_size,
            device=topology.device,
        )
        self.weight = nn.Parameter(weight)
        set_param_meta(self.weight, ParamMeta(tp_split_dim=0))
        self.sequence_parallel = topology.config.sequence_parallel and topology.tp_size > 1

    def final_hidden(self, x: Activations) -> torch.Tensor:
        """The final norm's output ``[b, s(/tp), hidden]`` at the positions that predict tokens."""
        h: torch.Tensor = self.norm(x["h"])
        if "soft_prompt_tokens" in x:  # prompt tuning prepended learned positions: they predict nothing
            h = h[:, x["soft_prompt_tokens"].shape[1] :]
        return h

    def forward(self, x: Activations) -> torch.Tensor:
        h = self.final_hidden(x)
        group = self.topology.tp_group
        h = all_gather_from_sp(h, group) if self.sequence_parallel else copy_to_tp(h, group)
        return nn.functional.linear(h, self.weight)  # [b, s, vocab / tp]; one GEMM with the weight as stored


class LanguageModelLoss:
    """Mean cross entropy over the positions whose ``loss_mask`` is 1 (all when absent).

    With ``ParallelModule(weight_fn=loss_tokens)`` each micro-batch's mean is weighted by its token count
    over the whole step, so the step's loss is the token mean one process would compute.
    """

    def __init__(self, topology: Topology) -> None:
        self.group = topology.tp_group

    def __call__(self, logits: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = batch["targets"]
        mask = batch.get("loss_mask")
        mask = torch.ones_like(targets, dtype=torch.float32) if mask is None else mask.float()
        per_token = vocab_parallel_cross_entropy(logits, targets, self.group)  # [b, s]
        tokens = mask.sum()
        loss = (per_token * mask).sum() / tokens.clamp(min=1)
        return loss, {"loss_tokens": tokens}


def loss_tokens(batch: dict[str, Any]) -> torch.Tensor:
    """A micro-batch's weight in the step's loss: its number of loss tokens (``ParallelModule(weight_fn=...)``)."""
    mask = batch.get("loss_mask")
    return mask.sum() if mask is not None else torch.tensor(float(batch["targets"].numel()))


def transformer_layer_specs(
    config: TransformerArchitectureConfig, topology: Topology, seed: int = 0
) -> list[LayerSpec]:
    """The whole model as pipeline layers; the embedding and head share weights when tied."""
    embedding: LayerSpec = (
        TiedLayerSpec(EmbeddingLayer, (config, topology, seed), key="embedding")
        if config.weight_tying
        else LayerSpec(EmbeddingLayer, (config, topology, seed))
    )
    head: LayerSpec = (
        TiedLayerSpec(LMHead, (config, topology, seed), key="embedding")
        if config.weight_tying
        else LayerSpec(LMHead, (config, topology, seed + 7))
    )
    layers = [LayerSpec(DecoderLayer, (config, topology, seed + 1000 * (i + 1))) for i in range(config.num_layers)]
    return [embedding, *layers, head]
