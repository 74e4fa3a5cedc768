"""Architecture presets: the shapes of Llama 2 (7B, 13B, 70B), Llama 3 (8B, 70B), Mistral 7B v0.3, and a tiny model.

A preset is a :class:`TransformerArchitectureConfig` and nothing else (no weights, no parallel layout, no
precision): the plain-loop user layer (``scaling.llama``, ``scaling.mistral``) and configs name a preset
instead of spelling out a dozen numbers, and ``pretrained=`` checkpoints converted from Hugging Face fit it
exactly. Each real preset holds what :func:`~scaling.transformer.convert.hf_config.architecture_from_hf`
reads from that model's ``config.json`` (a test checks every field against the published configs), so a
preset and a converted checkpoint never disagree on a shape.

Two conventions follow from that:

- ``sequence_length`` is the model's full context (``max_position_embeddings``), as the reader sets it.
  Training on shorter samples is an override (``preset_architecture("llama2-7b", sequence_length=2048)``);
  the context is kept in ``max_position_embeddings`` either way.
- ``vocab_multiple`` is 128: it divides 32000 (Llama 2), 32768 (Mistral v0.3) and 128256 (Llama 3), so the
  real models are not padded (their parameter counts are Hugging Face's), and the padded vocabulary still
  splits over any tensor-parallel size up to 128 (128256 = 128 x 1002).

Llama 3 here is Llama 3, not 3.1: rope theta 500000, no rope scaling, an 8192-token context. Mistral 7B is
v0.3: a 32768-token vocabulary and no sliding window (v0.1's 4096-token window is not expressible: the
attention here is full causal).

Names for ``Llama(size)`` (see :data:`LLAMA_SIZES`): ``"7b"``, ``"13b"``, ``"70b"`` are Llama 2 (the sizes
Llama 2 came in), ``"3-8b"`` and ``"3-70b"`` are Llama 3, ``"tiny"`` is the CPU test model.
"""

from __future__ import annotations

from scaling.transformer.model.config import TransformerArchitectureConfig

__all__ = [
    "LLAMA_SIZES",
    "PRESETS",
    "llama_architecture",
    "parameter_count",
    "preset_architecture",
]

# Divides every real vocabulary below and any tp up to 128; the Hugging Face reader pads to the same multiple.
_VOCAB_MULTIPLE = 128


def _llama_family(
    *,
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    context: int,
    rope_base: float,
    norm_eps: float = 1e-5,
) -> TransformerArchitectureConfig:
    """A Llama-shaped decoder: pre-norm RMSNorm, SwiGLU, RoPE on every head dim, no biases, untied head.

    ``num_kv_heads``, ``head_dim`` and ``max_position_embeddings`` are spelled out (not left to their
    defaults) because the Hugging Face reader sets them, and a preset must equal what it reads.
    """
    return TransformerArchitectureConfig(
        vocab_size=vocab,
        vocab_multiple=_VOCAB_MULTIPLE,
        hidden_size=hidden,
        num_layers=layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hidden // heads,
        sequence_length=context,
        max_position_embeddings=context,
        rope_base=rope_base,
        rope_scaling=None,
        norm_type="rms",
        norm_eps=norm_eps,
        mlp_type="swiglu",
        intermediate_size=intermediate,
        attention_bias=False,
        mlp_bias=False,
        weight_tying=False,
    )


PRESETS: dict[str, TransformerArchitectureConfig] = {
    "llama2-7b": _llama_family(
        vocab=32000, hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, context=4096, rope_base=1e4
    ),
    "llama2-13b": _llama_family(
        vocab=32000, hidden=5120, layers=40, heads=40, kv_heads=40, intermediate=13824, context=4096, rope_base=1e4
    ),
    "llama2-70b": _llama_family(
        vocab=32000, hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672, context=4096, rope_base=1e4
    ),
    "llama3-8b": _llama_family(
        vocab=128256, hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, context=8192, rope_base=5e5
    ),
    "llama3-70b": _llama_family(
        vocab=128256, hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672, context=8192, rope_base=5e5
    ),
    "mistral-7b": _llama_family(
        vocab=32768, hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, context=32768, rope_base=1e6
    ),
    # CPU tests and examples: Llama's layout (GQA, SwiGLU, RMSNorm, untied) at a size that trains in seconds.
    # 512 tokens hold a byte-level vocabulary (256 bytes and a few special tokens) with room to spare.
    "tiny": _llama_family(
        vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, context=128, rope_base=1e4
    ),
}
"""Every preset by name. The configs are frozen; :func:`preset_architecture` returns changed copies."""

LLAMA_SIZES: dict[str, str] = {
    "7b": "llama2-7b",
    "13b": "llama2-13b",
    "70b": "llama2-70b",
    "3-8b": "llama3-8b",
    "3-70b": "llama3-70b",
    "tiny": "tiny",
}
"""``Llama(size)`` sizes -> preset names: bare sizes are Llama 2, ``3-`` sizes Llama 3."""


def preset_architecture(name: str, **overrides: object) -> TransformerArchitectureConfig:
    """The preset ``name`` with ``overrides`` applied (e.g. ``sequence_length=2048``, ``attention_kernel=...``).

    The result is validated like any config, so an unknown field or a combination the model cannot build
    fails here with the field named, not later as a shape error.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown architecture preset {name!r}; known presets: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if not overrides:
        return preset
    return TransformerArchitectureConfig.from_dict(
        {**preset.to_dict(), **overrides}, source=f"preset {name!r} with overrides {', '.join(overrides)}"
    )


def llama_architecture(size: str, **overrides: object) -> TransformerArchitectureConfig:
    """The architecture of ``Llama(size)``: ``size`` is a key of :data:`LLAMA_SIZES`."""
    if size not in LLAMA_SIZES:
        known = ", ".join(f"{key!r} ({value})" for key, value in LLAMA_SIZES.items())
        raise ValueError(f"unknown Llama size {size!r}; known sizes: {known}")
    return preset_architecture(LLAMA_SIZES[size], **overrides)


def parameter_count(arch: TransformerArchitectureConfig) -> int:
    """Parameters of the whole model built from ``arch`` (all tensor-parallel shards together).

    Counted as :class:`~scaling.transformer.model.transformer.Transformer` builds it: the embedding over
    the *padded* vocabulary, per decoder layer the q, fused k/v and output projections, the MLP and two
    norms, then the final norm and the LM head (nothing extra when it is tied to the embedding). Replicated
    k/v projections (fewer kv heads than tp ranks) are one tensor of the model, counted once.
    """
    hidden, head = arch.hidden_size, arch.dims_per_head
    query_width = arch.num_attention_heads * head
    kv_width = 2 * arch.kv_heads * head
    attention = hidden * query_width + hidden * kv_width + query_width * hidden
    if arch.attention_bias:
        attention += query_width + kv_width + hidden
    projections = 3 if arch.mlp_type == "swiglu" else 2  # gate, up, down / up, down
    mlp = projections * hidden * arch.mlp_size
    if arch.mlp_bias:
        mlp += (projections - 1) * arch.mlp_size + hidden
    norm = hidden * (2 if arch.norm_type == "layer" and arch.norm_bias else 1)
    embedding = arch.padded_vocab_size * hidden
    lm_head = 0 if arch.weight_tying else embedding
    return embedding + arch.num_layers * (attention + mlp + 2 * norm) + norm + lm_head
