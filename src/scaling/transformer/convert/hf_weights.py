"""Tensor names and layouts: Hugging Face Llama <-> scaling checkpoint layers.

Scaling stores one file per pipeline layer (index 0 the embedding, 1..L the decoder layers, L+1 the final
norm and LM head) with full, unsharded tensors. Almost every tensor is copied unchanged; three differ:

* ``attention.key_value`` holds k and v of each kv head side by side, rows ``[kv_head, (k|v), d]``, so a
  tensor-parallel split hands every rank whole heads; Hugging Face keeps ``k_proj`` and ``v_proj`` apart.
* the embedding and LM head are padded with zero rows to ``padded_vocab_size``; Hugging Face is not.
* with tied weights the head is stored once, as the embedding (layer 0); Hugging Face omits ``lm_head``.

Both directions only copy, slice and pad (no arithmetic), so a round trip is bit-identical. The query and
key rows need no permutation: scaling's RoPE uses the "rotate half" pairing of Hugging Face Llama.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from scaling.transformer.model.config import TransformerArchitectureConfig

__all__ = [
    "hf_layer_from_scaling",
    "hf_tensor_shapes",
    "scaling_layer_from_hf",
    "scaling_tensor_shapes",
]

Shape = tuple[int, ...]
HFReader = Callable[[str], torch.Tensor]

# (scaling name inside a decoder layer, Hugging Face name inside model.layers.{i}) of the 1:1 projections
_PROJECTIONS = (
    ("attention.query", "self_attn.q_proj"),
    ("attention.dense", "self_attn.o_proj"),
    ("mlp.gate", "mlp.gate_proj"),
    ("mlp.up", "mlp.up_proj"),
    ("mlp.down", "mlp.down_proj"),
)
_NORMS = (("attention_norm.weight", "input_layernorm.weight"), ("mlp_norm.weight", "post_attention_layernorm.weight"))


def _has_bias(arch: TransformerArchitectureConfig, scaling_name: str) -> bool:
    return arch.attention_bias if scaling_name.startswith("attention.") else arch.mlp_bias


def _decoder_shapes(arch: TransformerArchitectureConfig) -> dict[str, Shape]:
    """Scaling key -> shape inside one decoder layer."""
    hidden, d, heads, kv, inner = (
        arch.hidden_size, arch.dims_per_head, arch.num_attention_heads, arch.kv_heads, arch.mlp_size,
    )  # fmt: skip
    weights = {
        "attention.query": (heads * d, hidden),
        "attention.key_value": (2 * kv * d, hidden),
        "attention.dense": (hidden, heads * d),
        "mlp.gate": (inner, hidden),
        "mlp.up": (inner, hidden),
        "mlp.down": (hidden, inner),
    }
    shapes: dict[str, Shape] = {"attention_norm.weight": (hidden,), "mlp_norm.weight": (hidden,)}
    for name, shape in weights.items():
        shapes[f"{name}.weight"] = shape
        if _has_bias(arch, name):
            shapes[f"{name}.bias"] = shape[:1]
    return shapes


def scaling_tensor_shapes(arch: TransformerArchitectureConfig) -> dict[int, dict[str, Shape]]:
    """Layer index -> key -> full shape of every tensor a scaling checkpoint of ``arch`` stores."""
    vocab, hidden, last = arch.padded_vocab_size, arch.hidden_size, arch.num_layers + 1
    shapes: dict[int, dict[str, Shape]] = {0: {"weight": (vocab, hidden)}}
    for index in range(1, last):
        shapes[index] = _decoder_shapes(arch)
    shapes[last] = {"norm.weight": (hidden,)}
    if not arch.weight_tying:
        shapes[last]["weight"] = (vocab, hidden)
    return shapes


def hf_tensor_shapes(arch: TransformerArchitectureConfig) -> dict[str, Shape]:
    """Hugging Face name -> shape of every tensor of the ``LlamaForCausalLM`` of ``arch``."""
    hidden, d, kv = arch.hidden_size, arch.dims_per_head, arch.kv_heads
    shapes: dict[str, Shape] = {"model.embed_tokens.weight": (arch.vocab_size, hidden)}
    decoder = _decoder_shapes(arch)
    for i in range(arch.num_layers):
        prefix = f"model.layers.{i}"
        for ours, theirs in _NORMS:
            shapes[f"{prefix}.{theirs}"] = decoder[ours]
        for ours, theirs in _PROJECTIONS:
            for suffix in ("weight", "bias"):
                if f"{ours}.{suffix}" in decoder:
                    shapes[f"{prefix}.{theirs}.{suffix}"] = decoder[f"{ours}.{suffix}"]
        for proj in ("k_proj", "v_proj"):
            shapes[f"{prefix}.self_attn.{proj}.weight"] = (kv * d, hidden)
            if arch.attention_bias:
                shapes[f"{prefix}.self_attn.{proj}.bias"] = (kv * d,)
    shapes["model.norm.weight"] = (hidden,)
    if not arch.weight_tying:
        shapes["lm_head.weight"] = (arch.vocab_size, hidden)
    return shapes


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows appended up to ``rows``: padded tokens have a zero embedding and a zero logit."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _interleave_kv(k: torch.Tensor, v: torch.Tensor, kv: int, d: int) -> torch.Tensor:
    """``[kv * d, ...]`` k and v -> ``[2 * kv * d, ...]`` rows ordered ``[kv_head, (k|v), d]``."""
    rest = k.shape[1:]
    return torch.stack([k.reshape(kv, d, *rest), v.reshape(kv, d, *rest)], dim=1).reshape(2 * kv * d, *rest)


def _split_kv(t: torch.Tensor, kv: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_interleave_kv`."""
    rest = t.shape[1:]
    grouped = t.reshape(kv, 2, d, *rest)  # [kv, (k|v), d, ...]
    return grouped[:, 0].reshape(kv * d, *rest), grouped[:, 1].reshape(kv * d, *rest)


def scaling_layer_from_hf(arch: TransformerArchitectureConfig, index: int, read: HFReader) -> dict[str, torch.Tensor]:
    """The tensors of scaling layer ``index``, reading Hugging Face tensors by name with ``read``."""
    vocab = arch.padded_vocab_size
    last = arch.num_layers + 1
    if index == 0:
        return {"weight": _pad_rows(read("model.embed_tokens.weight"), vocab)}
    if index == last:
        out = {"norm.weight": read("model.norm.weight")}
        if not arch.weight_tying:
            out["weight"] = _pad_rows(read("lm_head.weight"), vocab)
        return out
    prefix = f"model.layers.{index - 1}"
    out = {ours: read(f"{prefix}.{theirs}") for ours, theirs in _NORMS}
    suffixes = ("weight", "bias")
    for ours, theirs in _PROJECTIONS:
        for suffix in suffixes[: 2 if _has_bias(arch, ours) else 1]:
            out[f"{ours}.{suffix}"] = read(f"{prefix}.{theirs}.{suffix}")
    for suffix in suffixes[: 2 if arch.attention_bias else 1]:
        k, v = read(f"{prefix}.self_attn.k_proj.{suffix}"), read(f"{prefix}.self_attn.v_proj.{suffix}")
        out[f"attention.key_value.{suffix}"] = _interleave_kv(k, v, arch.kv_heads, arch.dims_per_head)
    return out


def hf_layer_from_scaling(
    arch: TransformerArchitectureConfig, index: int, tensors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Hugging Face name -> tensor for scaling layer ``index`` (its checked, LoRA-merged ``tensors``)."""
    vocab = arch.vocab_size
    last = arch.num_layers + 1
    if index == 0:
        return {"model.embed_tokens.weight": tensors["weight"][:vocab].clone()}
    if index == last:
        out = {"model.norm.weight": tensors["norm.weight"]}
        if not arch.weight_tying:
            out["lm_head.weight"] = tensors["weight"][:vocab].clone()
        return out
    prefix = f"model.layers.{index - 1}"
    out = {f"{prefix}.{theirs}": tensors[ours] for ours, theirs in _NORMS}
    for ours, theirs in _PROJECTIONS:
        for suffix in ("weight", "bias"):
            if f"{ours}.{suffix}" in tensors:
                out[f"{prefix}.{theirs}.{suffix}"] = tensors[f"{ours}.{suffix}"]
    for suffix in ("weight", "bias"):
        if f"attention.key_value.{suffix}" in tensors:
            k, v = _split_kv(tensors[f"attention.key_value.{suffix}"], arch.kv_heads, arch.dims_per_head)
            out[f"{prefix}.self_attn.k_proj.{suffix}"] = k
            out[f"{prefix}.self_attn.v_proj.{suffix}"] = v
    return out
