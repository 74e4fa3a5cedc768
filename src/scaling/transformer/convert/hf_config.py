"""Hugging Face Llama/Mistral ``config.json`` <-> ``TransformerArchitectureConfig``.

Both directions are pure functions on dicts, so every mapping rule is testable without tensors. Reading
accepts what transformers 4.x writes (top-level ``rope_theta`` and ``rope_scaling``) and what 5.x writes
(``rope_parameters`` holding theta, type and scaling). Writing uses the 4.x form, which 5.x reads too, so
an exported folder loads on either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import torch
from pydantic import ValidationError

from scaling.core.config import InvalidCombination
from scaling.transformer.convert.errors import ConversionError
from scaling.transformer.model.config import RopeScalingConfig, TransformerArchitectureConfig

__all__ = [
    "DTYPES",
    "SUPPORTED_MODEL_TYPES",
    "architecture_from_hf",
    "check_exportable",
    "dtype_name",
    "hf_config_from_architecture",
    "resolve_dtype",
]

SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Hugging Face pads nothing: scaling pads the vocabulary so it splits over tensor-parallel ranks. 128 keeps
# real Llama/Mistral vocabularies (32000, 32768, 128256) unpadded and divides over any tp up to 128.
VOCAB_MULTIPLE = 128
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 131072}  # the transformers defaults of each model type

T = TypeVar("T")
JsonValue = object


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``None`` (keep what is stored), a ``torch.dtype`` or its name: float32, bfloat16, float16."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConversionError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ConversionError(f"dtype {dtype} is not supported; choose one of {', '.join(DTYPES)}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ConversionError(f"tensors of dtype {dtype} are not supported; convert with dtype one of {', '.join(DTYPES)}")


def _typed(hf: Mapping[str, JsonValue], key: str, kind: type[T], default: T | None, source: str) -> T:
    """``hf[key]`` checked to be a ``kind`` (ints accepted for floats); a missing or null key gives ``default``."""
    value = hf.get(key)
    if value is None:
        if default is None:
            raise ConversionError(f"{source}: {key} is missing")
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConversionError(f"{source}: {key} must be a {kind.__name__}, got {value!r}")
    return value


def _rope(hf: Mapping[str, JsonValue], source: str) -> tuple[float, RopeScalingConfig | None]:
    """RoPE theta and Llama-3 scaling from either the 5.x ``rope_parameters`` or the 4.x fields."""
    parameters = hf.get("rope_parameters")
    legacy = hf.get("rope_scaling")
    where = "rope_parameters" if isinstance(parameters, Mapping) else "rope_scaling"
    rope = parameters if isinstance(parameters, Mapping) else legacy if isinstance(legacy, Mapping) else {}
    if parameters is not None and not isinstance(parameters, Mapping):
        raise ConversionError(f"{source}: rope_parameters must be a mapping, got {parameters!r}")
    if legacy is not None and not isinstance(legacy, Mapping):
        raise ConversionError(f"{source}: rope_scaling must be a mapping or null, got {legacy!r}")
    theta = _typed(rope, "rope_theta", float, _typed(hf, "rope_theta", float, 10000.0, source), f"{source} {where}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConversionError(
            f"{source}: partial_rotary_factor {partial!r} is not supported by Llama models; only 1.0 converts"
        )
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ConversionError(f"{source}: {where}.rope_type {kind!r} is not supported; convertible: default, llama3")
    context = f"{source} {where}"
    scaling = RopeScalingConfig(
        factor=_typed(rope, "factor", float, None, context),
        low_freq_factor=_typed(rope, "low_freq_factor", float, None, context),
        high_freq_factor=_typed(rope, "high_freq_factor", float, None, context),
        original_max_position_embeddings=_typed(rope, "original_max_position_embeddings", int, None, context),
    )
    return theta, scaling


def architecture_from_hf(hf: Mapping[str, JsonValue], source: str = "config.json") -> TransformerArchitectureConfig:
    """The scaling architecture of a Hugging Face Llama or Mistral ``config.json`` (``source`` names it)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"{source}: model_type {model_type!r} is not supported; convertible: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    assert isinstance(model_type, str)
    architectures = hf.get("architectures") or []
    if not isinstance(architectures, list):
        architectures = [architectures]
    unknown = [a for a in architectures if a not in SUPPORTED_MODEL_TYPES.values()]
    if unknown:
        raise ConversionError(
            f"{source}: architectures {unknown!r} are not supported; convertible: "
            f"{', '.join(SUPPORTED_MODEL_TYPES.values())}"
        )
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConversionError(f"{source}: hidden_act {act!r} is not supported; Llama-family MLPs use silu")
    max_positions = _typed(hf, "max_position_embeddings", int, _DEFAULT_MAX_POSITIONS[model_type], source)
    window = hf.get("sliding_window")
    if window is not None and (not isinstance(window, int) or window < max_positions):
        raise ConversionError(
            f"{source}: sliding_window {window!r} is smaller than max_position_embeddings ({max_positions}); "
            "sliding-window attention is not supported (null, or a window covering the whole context, converts)"
        )
    heads = _typed(hf, "num_attention_heads", int, None, source)
    hidden = _typed(hf, "hidden_size", int, None, source)
    if heads < 1:
        raise ConversionError(f"{source}: num_attention_heads must be positive, got {heads}")
    theta, scaling = _rope(hf, source)
    biases = model_type == "llama"  # Mistral layers have no biases, whatever stray keys config.json holds
    try:
        return TransformerArchitectureConfig(
            vocab_size=_typed(hf, "vocab_size", int, None, source),
            vocab_multiple=VOCAB_MULTIPLE,
            hidden_size=hidden,
            num_layers=_typed(hf, "num_hidden_layers", int, None, source),
            num_attention_heads=heads,
            num_kv_heads=_typed(hf, "num_key_value_heads", int, heads, source),
            head_dim=_typed(hf, "head_dim", int, hidden // heads, source),
            sequence_length=max_positions,
            max_position_embeddings=max_positions,
            rope_base=theta,
            rope_scaling=scaling,
            norm_type="rms",
            norm_eps=_typed(hf, "rms_norm_eps", float, 1e-6, source),
            mlp_type="swiglu",
            intermediate_size=_typed(hf, "intermediate_size", int, None, source),
            attention_bias=biases and _typed(hf, "attention_bias", bool, False, source),
            mlp_bias=biases and _typed(hf, "mlp_bias", bool, False, source),
            weight_tying=_typed(hf, "tie_word_embeddings", bool, False, source),
            attention_dropout=_typed(hf, "attention_dropout", float, 0.0, source),
        )
    except (ValidationError, InvalidCombination) as exc:
        raise ConversionError(f"{source}: does not describe a valid scaling architecture: {exc}") from None


def check_exportable(arch: TransformerArchitectureConfig, source: str = "architecture") -> None:
    """Raise ``ConversionError`` naming the first field that has no Llama equivalent."""
    if arch.norm_type != "rms":
        bias = " with norm_bias" if arch.norm_bias else ""
        raise ConversionError(f"{source}.norm_type {arch.norm_type!r}{bias} has no Llama equivalent (Llama uses rms)")
    if arch.mlp_type != "swiglu":
        raise ConversionError(f"{source}.mlp_type {arch.mlp_type!r} has no Llama equivalent (Llama uses swiglu)")
    if arch.rotary_fraction != 1.0:
        raise ConversionError(
            f"{source}.rotary_fraction {arch.rotary_fraction} has no Llama equivalent (Llama rotates every dim: 1.0)"
        )


def hf_config_from_architecture(
    arch: TransformerArchitectureConfig, dtype: torch.dtype, token_ids: Mapping[str, JsonValue] | None = None
) -> dict[str, JsonValue]:
    """A ``LlamaForCausalLM`` ``config.json`` for ``arch`` (checked with :func:`check_exportable`).

    ``token_ids``: ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` when known (null otherwise, rather
    than the Llama defaults 1 and 2, which would be wrong for most tokenizers).
    """
    check_exportable(arch)
    ids = dict(token_ids or {})
    rope_scaling = None
    if arch.rope_scaling is not None:
        rope_scaling = {"rope_type": "llama3", **arch.rope_scaling.to_dict()}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.mlp_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.kv_heads,
        "head_dim": arch.dims_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": arch.context_length,
        "rms_norm_eps": arch.norm_eps,
        "rope_theta": arch.rope_base,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": arch.weight_tying,
        "attention_bias": arch.attention_bias,
        "mlp_bias": arch.mlp_bias,
        "attention_dropout": arch.attention_dropout,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": ids.get("bos_token_id"),
        "eos_token_id": ids.get("eos_token_id"),
        "pad_token_id": ids.get("pad_token_id"),
        "dtype": dtype_name(dtype),  # transformers 5
        "torch_dtype": dtype_name(dtype),  # transformers 4
    }
