"""Self-attention with tensor-parallel heads: MHA, GQA and MQA, RoPE, causal and per-document masks.

Column-parallel projections give each tp rank ``heads / tp`` query heads and the kv heads they use;
the row-parallel output projection sums the ranks' contributions. Three kernels compute the same thing:
``torch`` (``scaled_dot_product_attention``), ``flash_attention`` (flash-attn, GPU) and ``reference``
(explicit softmax; the one the others are tested against).

Incremental decoding runs the same module: given :class:`CacheSlots`, the keys and values of this call
are written into a pre-allocated :class:`KVCache` and the queries attend to every slot so far. Those
calls always use SDPA, because their masks (left padding, a query block against a longer key range)
are not the square causal mask flash-attn's kernel assumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from scaling.core.nn import (
    ColumnParallelLinear,
    LayoutInvariantDropout,
    ParamMeta,
    RowParallelLinear,
    all_gather_from_sp,
    copy_to_tp,
    set_param_meta,
)
from scaling.core.nn.param_meta import InitMethod, init_normal, init_zeros, local_slice_of_init
from scaling.core.topology import Topology
from scaling.transformer.model.config import TransformerArchitectureConfig, check_against_tensor_parallel
from scaling.transformer.model.rope import apply_rotary

__all__ = [
    "Attention",
    "CacheSlots",
    "KVCache",
    "ReplicatedLinear",
    "attention_mask",
    "kv_heads_per_rank",
    "padding_mask",
    "reference_attention",
]


def attention_mask(seq: int, document_ids: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Boolean ``[b or 1, 1, s, s]``: True where a query may attend (causal, and same document if given)."""
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    if document_ids is None:
        return causal[None, None]
    same = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)  # [b, s, s]
    return (causal & same).unsqueeze(1)


def padding_mask(valid: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Boolean ``[b, 1, length, start + length]`` for queries at slots ``start..start+length``.

    Causal over slots, and slots whose ``valid`` ``[b, >= start + length]`` is False (left padding) are
    never attended. A padding query still attends to itself: a row with nothing to attend to would give
    NaN, and NaN in the cache would poison real rows through ``0 * NaN`` in the attention product.
    """
    slots = start + length
    query = torch.arange(start, slots, device=valid.device).unsqueeze(-1)  # [s, 1]
    key = torch.arange(slots, device=valid.device)  # [slots]
    mask = (key <= query) & valid[:, None, :slots]  # [b, s, slots]
    mask |= key == query
    return mask.unsqueeze(1)


def kv_heads_per_rank(config: TransformerArchitectureConfig, tp: int) -> int:
    """Key/value heads one tp rank holds: its share, or the one head it replicates when there are fewer."""
    return 1 if config.kv_heads < tp else config.kv_heads // tp


class KVCache:
    """Keys and values of every layer for ``max_slots`` positions, allocated once for a whole generation.

    ``[layers, batch, kv_heads, max_slots, head_dim]`` with this rank's kv heads only: SDPA reads each
    cached head for its whole query group (``enable_gqa``), so heads are never repeated in memory.
    """

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


@dataclass(frozen=True)
class CacheSlots:
    """Where one inference call's keys and values go: slots ``start..`` of decoder layer ``layer``'s cache.

    ``cache`` None is a padded full-sequence pass (scoring, generation without a cache): nothing is
    stored, but the call still takes the inference path (SDPA under a padding mask).
    """

    cache: KVCache | None
    layer: int
    start: int

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This call's ``k``, ``v`` ``[b, kv, s, d]`` after the cached ones: ``[b, kv, start + s, d]``."""
        if self.cache is None:
            return k, v
        return self.cache.update(self.layer, k, v, self.start)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout: LayoutInvariantDropout | None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v, in float32. q ``[b, h, s, d]``; k, v already expanded to h heads."""
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [b, h, s, s]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    if dropout is not None:
        probs = dropout(probs)
    return (probs @ v.float()).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, config: TransformerArchitectureConfig, topology: Topology, seed: int) -> None:
        super().__init__()
        check_against_tensor_parallel(config, topology.tp_size)
        tp, rank = topology.tp_size, topology.tp_rank
        self.config = config
        self.head_dim = config.dims_per_head
        self.heads_local = config.num_attention_heads // tp
        kv = config.kv_heads
        self.kv_replicated = kv < tp
        self.kv_heads_local = kv_heads_per_rank(config, tp)
        init = init_normal(0.02)
        self.query = ColumnParallelLinear(
            config.hidden_size, config.num_attention_heads * self.head_dim, topology,
            bias=config.attention_bias, init_method=init, seed=seed,
        )  # fmt: skip
        # k and v of each kv head side by side ([kv, 2, d] rows), so a column split hands each rank whole heads.
        kv_rows = 2 * kv * self.head_dim
        if self.kv_replicated:
            # Fewer kv heads than ranks: every rank holds the full (small) k/v projection and uses the head its
            # query heads need. Each rank's gradient is then partial and the engine sums it over tp ranks.
            self.key_value: nn.Module = ReplicatedLinear(
                config.hidden_size, kv_rows, topology, config.attention_bias, init, seed + 10
            )
            self.kv_head_index = rank * self.heads_local // (config.num_attention_heads // kv)
        else:
            self.key_value = ColumnParallelLinear(
                config.hidden_size, kv_rows, topology, bias=config.attention_bias, init_method=init, seed=seed + 10
            )
            self.kv_head_index = 0
        self.dense = RowParallelLinear(
            config.num_attention_heads * self.head_dim, config.hidden_size, topology,
            bias=config.attention_bias, init_method=init, seed=seed + 20,
        )  # fmt: skip
        self.attention_dropout = LayoutInvariantDropout(
            config.attention_dropout, split_dim=1, split_parts=tp, split_index=rank
        )
        self.topology = topology

    def project_qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries ``[b, h_local, s, d]`` and keys, values ``[b, kv_local, s, d]`` of this rank's heads.

        Incremental decoding (``slots`` in :meth:`forward`) differs only in the core between this and
        :meth:`project_out`.
        """
        b, s = x.shape[0], cos.shape[1]  # x: [b, s, hidden], or [b, s / tp, hidden] under sequence parallelism
        q = self.query(x).view(b, s, self.heads_local, self.head_dim).transpose(1, 2)  # [b, h_local, s, d]
        kv = self.key_value(x).view(b, s, -1, 2, self.head_dim)  # [b, s, kv_all_or_local, 2, d]
        if self.kv_replicated:
            kv = kv[:, :, self.kv_head_index : self.kv_head_index + 1]
        k, v = kv[..., 0, :].transpose(1, 2), kv[..., 1, :].transpose(1, 2)  # [b, kv_local, s, d]
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
        slots: CacheSlots | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Self-attention of ``x``; ``mask`` ``[b or 1, 1, s, slots]`` says which slots each query sees.

        With ``slots`` (inference), keys and values of earlier calls come from the cache and this call's
        are stored after them; the queries attend to all of them.
        """
        q, k, v = self.project_qkv(x, cos, sin)
        if slots is not None:
            k, v = slots.extend(k, v)  # [b, kv_local, start + s, d]
            out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            return self.project_out(out)  # [b, s, hidden], summed over tp ranks
        kernel = self.config.attention_kernel
        p = self.config.attention_dropout if self.training else 0.0
        if kernel == "torch" and p == 0:  # SDPA reads each kv head for its query group: no repeated copies
            out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            return self.project_out(out)
        repeat = self.heads_local // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)  # [b, h_local, s, d]
        if kernel == "reference":
            out = reference_attention(q, k, v, mask, self.attention_dropout if self.training else None)
        elif kernel == "flash_attention":
            out = _flash(q, k, v, self.config.attention_dropout if self.training else 0.0)
        else:  # SDPA's own dropout is not layout-invariant: use the reference math for it
            out = reference_attention(q, k, v, mask, self.attention_dropout)
        return self.project_out(out)

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output ``[b, h_local, s, d]`` -> ``[b, s(/tp under SP), hidden]``, summed over tp ranks."""
        b, _, s, _ = out.shape
        out = out.transpose(1, 2).reshape(b, s, self.heads_local * self.head_dim)  # [b, s, h_local * d]
        result: torch.Tensor = self.dense(out)  # [b, s(/tp under SP), hidden], summed over tp ranks
        return result


class ReplicatedLinear(nn.Module):
    """``Y = X A^T + b`` with the full ``A`` on every tp rank, for inputs in a tensor-parallel region.

    Initialised like the tp=1 weight; entering goes through ``copy_to_tp`` (or the sequence all-gather) so
    the input gradient is summed over ranks, and the weights are marked as holding partial gradients.
    """

    def __init__(
        self, in_features: int, out_features: int, topology: Topology, bias: bool, init: InitMethod, seed: int
    ) -> None:
        super().__init__()
        self.topology = topology
        weight = local_slice_of_init((out_features, in_features), init, seed, None, 0, 1, device=topology.device)
        self.weight = nn.Parameter(weight)
        set_param_meta(self.weight, ParamMeta(partial_grad_over_tp=topology.tp_size > 1))
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = nn.Parameter(
                local_slice_of_init((out_features,), init_zeros, seed + 1, None, 0, 1, device=topology.device)
            )
            set_param_meta(self.bias, ParamMeta(partial_grad_over_tp=topology.tp_size > 1))
        self.sequence_parallel = topology.config.sequence_parallel and topology.tp_size > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.topology.tp_group
        x = all_gather_from_sp(x, group) if self.sequence_parallel else copy_to_tp(x, group)
        return nn.functional.linear(x, self.weight, self.bias)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """Causal flash attention; [b, h, s, d] in and out (flash-attn wants [b, s, h, d])."""
    from flash_attn import flash_attn_func  # type: ignore[import-not-found]  # GPU only; checked at config load

    out: torch.Tensor = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout, causal=True
    )
    return out.transpose(1, 2)
