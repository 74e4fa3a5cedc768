"""``TransformerArchitectureConfig``: the shape of a Llama-class decoder (MHA/GQA/MQA, RoPE, SwiGLU).

Attention heads, grouped::

    query heads:  q0 q1 q2 q3 q4 q5 q6 q7      num_attention_heads = 8
    kv heads:     k0    k1    k2    k3         num_kv_heads = 4  (GQA; 8 = MHA, 1 = MQA)

Each kv head serves ``num_attention_heads / num_kv_heads`` consecutive query heads. Over tensor-parallel
ranks the query heads split evenly; kv heads split too when there are at least as many as ranks, and are
replicated (each rank keeps the one its query heads use) when there are fewer.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Literal

from pydantic import Field, model_validator

from scaling.core.config import BaseConfig, InvalidCombination

__all__ = [
    "RopeScalingConfig",
    "TransformerArchitectureConfig",
    "check_against_tensor_parallel",
    "projection_names",
]


class RopeScalingConfig(BaseConfig):
    """Llama-3 style frequency scaling for contexts longer than the model was trained on."""

    factor: float = Field(8.0, gt=0, description="How much longer the target context is.")
    low_freq_factor: float = Field(1.0, gt=0, description="Wavelengths above original/low_freq_factor are scaled.")
    high_freq_factor: float = Field(4.0, gt=0, description="Wavelengths below original/high_freq_factor are kept.")
    original_max_position_embeddings: int = Field(8192, ge=1, description="Context length before scaling.")


class TransformerArchitectureConfig(BaseConfig):
    """Shape and options of the decoder-only transformer."""

    vocab_size: int = Field(32000, ge=1, description="Tokens of the tokenizer (padded up for tensor parallelism).")
    vocab_multiple: int = Field(
        128,
        ge=1,
        description="Pad the vocabulary to a multiple of this (it must also divide over the tensor-parallel ranks). "
        "Independent of the layout, so every layout builds the same model.",
    )
    hidden_size: int = Field(512, ge=1, description="Width of the residual stream.")
    num_layers: int = Field(8, ge=1, description="Decoder layers.")
    num_attention_heads: int = Field(8, ge=1, description="Query heads.")
    num_kv_heads: int | None = Field(
        None, ge=1, description="Key/value heads: = heads for MHA, fewer for GQA, 1 for MQA; default = heads."
    )
    head_dim: int | None = Field(None, ge=1, description="Width of one head; default hidden_size / heads.")
    sequence_length: int = Field(1024, ge=1, description="Tokens per training sample.")
    max_position_embeddings: int | None = Field(
        None,
        ge=1,
        description="Longest context the model is meant for (Hugging Face's max_position_embeddings, kept through "
        "conversion when training on shorter samples); default sequence_length.",
    )
    rope_base: float = Field(10000.0, gt=0, description="RoPE base (theta).")
    rotary_fraction: float = Field(1.0, gt=0, le=1, description="Fraction of each head's dims that is rotated.")
    rope_scaling: RopeScalingConfig | None = Field(None, description="Llama-3 frequency scaling; none when unset.")
    norm_type: Literal["rms", "layer"] = Field("rms", description="RMSNorm or LayerNorm.")
    norm_eps: float = Field(1e-5, gt=0, description="Epsilon of the norms.")
    mlp_type: Literal["swiglu", "gelu"] = Field("swiglu", description="Gated SiLU MLP or plain GELU MLP.")
    intermediate_size: int | None = Field(
        None, ge=1, description="MLP inner width; default mlp_factor x hidden_size (rounded to a multiple of 64)."
    )
    mlp_factor: float = Field(8 / 3, gt=0, description="Inner width over hidden_size when intermediate_size is unset.")
    attention_bias: bool = Field(False, description="Biases in the q/k/v and output projections.")
    mlp_bias: bool = Field(False, description="Biases in the MLP projections.")
    norm_bias: bool = Field(False, description="Bias in LayerNorm (ignored for RMSNorm).")
    weight_tying: bool = Field(False, description="Share the embedding matrix with the LM head.")
    embedding_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout after the embedding.")
    attention_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on attention probabilities.")
    attention_output_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout after the attention block.")
    mlp_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout after the MLP block.")
    attention_kernel: Literal["torch", "flash_attention", "reference"] = Field(
        "torch",
        description="'torch' (scaled_dot_product_attention), 'flash_attention' (needs the flash-attn package), "
        "or 'reference' (explicit softmax, for tests).",
    )
    document_masking: bool = Field(
        False, description="Packed sequences: attention does not cross document boundaries (needs document ids)."
    )

    @model_validator(mode="after")
    def _check(self) -> TransformerArchitectureConfig:
        heads, kv = self.num_attention_heads, self.kv_heads
        if heads % kv != 0:
            raise InvalidCombination(
                f"num_attention_heads ({heads}) must be divisible by num_kv_heads ({kv})", "num_kv_heads"
            )
        if self.head_dim is None and self.hidden_size % heads != 0:
            raise InvalidCombination(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({heads}) "
                "unless head_dim is given",
                "hidden_size",
            )
        rotary = int(self.dims_per_head * self.rotary_fraction)
        if rotary % 2 != 0 or rotary == 0:
            raise InvalidCombination(
                f"rotary_fraction ({self.rotary_fraction}) x head_dim ({self.dims_per_head}) = {rotary} rotated "
                "dims: must be a positive even number",
                "rotary_fraction",
            )
        if self.attention_kernel == "flash_attention" and self.document_masking:
            raise InvalidCombination(
                "document_masking is not supported by the flash_attention kernel here; use attention_kernel 'torch'",
                "document_masking",
            )
        if self.attention_kernel == "flash_attention" and importlib.util.find_spec("flash_attn") is None:
            raise InvalidCombination(
                "attention_kernel 'flash_attention' needs the flash-attn package: "
                "pip install 'scaling[gpu_optimization]'",
                "attention_kernel",
            )
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def dims_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dims(self) -> int:
        return int(self.dims_per_head * self.rotary_fraction)

    @property
    def mlp_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return 64 * math.ceil(self.mlp_factor * self.hidden_size / 64)

    @property
    def context_length(self) -> int:
        """The context the model supports: max_position_embeddings, and at least what it was trained on."""
        return max(self.max_position_embeddings or 0, self.sequence_length)

    @property
    def padded_vocab_size(self) -> int:
        return self.vocab_multiple * math.ceil(self.vocab_size / self.vocab_multiple)


def check_against_tensor_parallel(config: TransformerArchitectureConfig, tp: int) -> None:
    """Raise ``InvalidCombination`` when the heads cannot be split over ``tp`` ranks."""
    if config.num_attention_heads % tp != 0:
        raise InvalidCombination(
            f"num_attention_heads ({config.num_attention_heads}) must be divisible by the tensor-parallel size ({tp})",
            "num_attention_heads",
        )
    kv = config.kv_heads
    if kv >= tp and kv % tp != 0:
        raise InvalidCombination(
            f"num_kv_heads ({kv}) must be divisible by the tensor-parallel size ({tp})", "num_kv_heads"
        )
    if kv < tp and tp % kv != 0:
        raise InvalidCombination(
            f"num_kv_heads ({kv}) fewer than tensor-parallel ranks ({tp}) must divide it so each rank replicates "
            "exactly one kv head",
            "num_kv_heads",
        )
    if config.padded_vocab_size % tp != 0:
        raise InvalidCombination(
            f"the padded vocabulary ({config.padded_vocab_size}) must be divisible by the tensor-parallel size ({tp}); "
            "raise vocab_multiple",
            "vocab_multiple",
        )
    if config.mlp_size % tp != 0:
        raise InvalidCombination(
            f"the MLP width ({config.mlp_size}) must be divisible by the tensor-parallel size ({tp})",
            "intermediate_size",
        )


def projection_names(config: TransformerArchitectureConfig) -> list[str]:
    """The linear projections of one decoder layer, named as inside it (what LoRA targets can name).

    Kept next to the config so targets are checked when the config loads; building the model checks
    the real modules again (:func:`scaling.transformer.finetuning.apply.finetuning_adapter`).
    """
    mlp = ["mlp.gate", "mlp.up", "mlp.down"] if config.mlp_type == "swiglu" else ["mlp.up", "mlp.down"]
    return ["attention.query", "attention.key_value", "attention.dense", *mlp]
