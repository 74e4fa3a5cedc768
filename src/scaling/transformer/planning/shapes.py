"""This rank's parameter sizes on a layout, from the architecture alone (no model is built): what the
memory estimate reads from a built model's parameter table, so ``scaling plan`` can size a 70B model on a
laptop. Checked against real parameter tables in ``tests/transformer/test_plan_memory.py``.
"""

from __future__ import annotations

from scaling.core.pipeline.partition import partition
from scaling.core.zero.memory import ParamSize
from scaling.transformer.model.config import TransformerArchitectureConfig

__all__ = ["decoder_layer_sizes", "stage_layers", "stage_param_sizes"]


def _norm(name: str, arch: TransformerArchitectureConfig, layer: int) -> list[ParamSize]:
    sizes = [ParamSize(f"{name}.weight", arch.hidden_size, layer=layer)]
    if arch.norm_type == "layer" and arch.norm_bias:
        sizes.append(ParamSize(f"{name}.bias", arch.hidden_size, layer=layer))
    return sizes


def _linear(name: str, inputs: int, outputs: int, bias: int, layer: int) -> list[ParamSize]:
    sizes = [ParamSize(f"{name}.weight", inputs * outputs, layer=layer)]
    if bias:
        sizes.append(ParamSize(f"{name}.bias", bias, layer=layer))
    return sizes


def decoder_layer_sizes(arch: TransformerArchitectureConfig, tp: int, layer: int) -> list[ParamSize]:
    """One decoder layer's parameters on one of ``tp`` ranks: column-parallel projections split their
    outputs, row-parallel ones their inputs (their bias is whole), a rank that replicates a kv head holds
    the whole (small) k/v projection, norms are whole."""
    h, d = arch.hidden_size, arch.dims_per_head
    heads = arch.num_attention_heads // tp
    kv = arch.kv_heads if arch.kv_heads < tp else arch.kv_heads // tp
    f = arch.mlp_size // tp
    attn_bias, mlp_bias = arch.attention_bias, arch.mlp_bias
    sizes = _norm(f"{layer}.attention_norm", arch, layer)
    sizes += _linear(f"{layer}.attention.query", h, heads * d, heads * d if attn_bias else 0, layer)
    sizes += _linear(f"{layer}.attention.key_value", h, 2 * kv * d, 2 * kv * d if attn_bias else 0, layer)
    sizes += _linear(f"{layer}.attention.dense", heads * d, h, h if attn_bias else 0, layer)
    sizes += _norm(f"{layer}.mlp_norm", arch, layer)
    if arch.mlp_type == "swiglu":
        sizes += _linear(f"{layer}.mlp.gate", h, f, f if mlp_bias else 0, layer)
    sizes += _linear(f"{layer}.mlp.up", h, f, f if mlp_bias else 0, layer)
    sizes += _linear(f"{layer}.mlp.down", f, h, h if mlp_bias else 0, layer)
    return sizes


def stage_layers(
    arch: TransformerArchitectureConfig, pp: int, method: str = "uniform", n_chunks: int = 1
) -> list[list[int]]:
    """Per pipeline rank, the layer indices it holds (0 the embedding, ``num_layers + 1`` the head), with
    the engine's partitioning over ``pp * n_chunks`` virtual stages (virtual stage ``c * pp + s`` on rank
    ``s``). ``balanced`` partitioning needs per-layer weights and is planned as uniform."""
    n = arch.num_layers + 2
    ranges = partition(n, pp * n_chunks, method if method != "balanced" else "uniform")
    return [[i for chunk in range(n_chunks) for i in ranges[chunk * pp + stage]] for stage in range(pp)]


def stage_param_sizes(
    arch: TransformerArchitectureConfig, *, tp: int, pp: int, stage: int, method: str = "uniform", n_chunks: int = 1
) -> list[ParamSize]:
    """Parameter sizes of pipeline rank ``stage`` on one tensor-parallel rank, keyed by layer index as the
    parameter table keys them. A tied head on the embedding's rank is the embedding (counted once, one
    unit); on another rank it is that rank's own copy."""
    layers = stage_layers(arch, pp, method, n_chunks)[stage]
    head_index = arch.num_layers + 1
    vocab = arch.padded_vocab_size // tp
    tied_here = arch.weight_tying and 0 in layers and head_index in layers
    sizes: list[ParamSize] = []
    for index in layers:
        if index == 0:
            sizes.append(ParamSize("0.embedding.weight", vocab * arch.hidden_size, layer=0))
        elif index == head_index:
            sizes += _norm(f"{index}.norm", arch, index)
            if not tied_here:
                sizes.append(ParamSize(f"{index}.weight", vocab * arch.hidden_size, layer=index))
        else:
            sizes += decoder_layer_sizes(arch, tp, index)
    return sizes
