"""Architecture presets: equal to the real models' Hugging Face configs, with their real parameter counts.

The ``config.json`` literals below are the published configs of each model (only the fields that matter
for the shape are kept; nothing is downloaded). They go through the same reader ``scaling convert from-hf``
uses, so a failure of the comparison test means a preset would not fit that model's converted weights; a
failure of a count test means :func:`parameter_count` (or the model it describes) drifted from what
``Transformer`` builds.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from scaling.core.config import ConfigError
from scaling.core.topology import Topology
from scaling.transformer.convert.hf_config import architecture_from_hf, hf_config_from_architecture
from scaling.transformer.model.config import TransformerArchitectureConfig, check_against_tensor_parallel
from scaling.transformer.model.transformer import Transformer
from scaling.transformer.presets import (
    LLAMA_SIZES,
    PRESETS,
    llama_architecture,
    parameter_count,
    preset_architecture,
)

_LLAMA2_COMMON: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 4096,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,  # Llama 2's files have no rope_theta: the reader's default 10000 is theirs
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "use_cache": True,
    "vocab_size": 32000,
}
_LLAMA3_COMMON: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 8192,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,  # Llama 3, not 3.1 (which adds llama3 rope scaling and a 131072 context)
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}
HF_CONFIGS: dict[str, dict[str, Any]] = {
    "llama2-7b": {  # meta-llama/Llama-2-7b-hf
        **_LLAMA2_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
    },
    "llama2-13b": {  # meta-llama/Llama-2-13b-hf
        **_LLAMA2_COMMON,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_attention_heads": 40,
        "num_hidden_layers": 40,
        "num_key_value_heads": 40,
    },
    "llama2-70b": {  # meta-llama/Llama-2-70b-hf
        **_LLAMA2_COMMON,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
        "num_key_value_heads": 8,
    },
    "llama3-8b": {  # meta-llama/Meta-Llama-3-8B
        **_LLAMA3_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
    },
    "llama3-70b": {  # meta-llama/Meta-Llama-3-70B
        **_LLAMA3_COMMON,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
        "num_key_value_heads": 8,
    },
    "mistral-7b": {  # mistralai/Mistral-7B-v0.3
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": None,  # v0.3 dropped v0.1's 4096-token window
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 32768,
    },
}

# Parameter counts of the Hugging Face models (sum of numel over the checkpoint's tensors).
HF_PARAMETER_COUNTS = {
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "mistral-7b": 7_248_023_552,
}

# Every field architecture_from_hf sets; the comparison covers each of them (and the rest stay defaults).
FIELDS_THE_READER_SETS = {
    "vocab_size",
    "vocab_multiple",
    "hidden_size",
    "num_layers",
    "num_attention_heads",
    "num_kv_heads",
    "head_dim",
    "sequence_length",
    "max_position_embeddings",
    "rope_base",
    "rope_scaling",
    "norm_type",
    "norm_eps",
    "mlp_type",
    "intermediate_size",
    "attention_bias",
    "mlp_bias",
    "weight_tying",
    "attention_dropout",
}

REAL = sorted(HF_CONFIGS)


def test_registry_holds_exactly_the_documented_presets() -> None:
    assert set(PRESETS) == {*HF_CONFIGS, "tiny"}
    assert all(isinstance(arch, TransformerArchitectureConfig) for arch in PRESETS.values())


@pytest.mark.parametrize("name", REAL)
def test_preset_equals_the_models_hugging_face_config(name: str) -> None:
    read = architecture_from_hf(HF_CONFIGS[name], source=f"{name} config.json")
    assert read.model_fields_set == FIELDS_THE_READER_SETS  # the list below compares every one of them
    preset = PRESETS[name]
    differing = {
        field: (getattr(preset, field), getattr(read, field))
        for field in sorted(FIELDS_THE_READER_SETS)
        if getattr(preset, field) != getattr(read, field)
    }
    assert differing == {}, f"{name}: preset vs config.json (preset, read): {differing}"
    assert preset.to_dict() == read.to_dict()  # the fields the reader leaves alone are defaults in both


@pytest.mark.parametrize("name", REAL)
def test_real_vocabularies_are_not_padded_and_every_preset_splits_over_tp_up_to_8(name: str) -> None:
    arch = PRESETS[name]
    assert arch.padded_vocab_size == arch.vocab_size == HF_CONFIGS[name]["vocab_size"]
    for tp in (1, 2, 4, 8):
        check_against_tensor_parallel(arch, tp)  # raises naming the field that does not split


@pytest.mark.parametrize("name", REAL)
def test_parameter_count_formula_gives_the_hugging_face_count(name: str) -> None:
    assert parameter_count(PRESETS[name]) == HF_PARAMETER_COUNTS[name]


class _RealAllocations(TorchDispatchMode):
    """Bytes of every tensor an op creates off the meta device (a build that really allocates shows here)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and not leaf.is_meta:
                self.bytes += leaf.numel() * leaf.element_size()
        return out


@pytest.mark.parametrize("name", REAL)
def test_meta_build_has_the_hugging_face_count_and_allocates_nothing(name: str) -> None:
    # The topology's device must be meta as well: Transformer moves itself to topology.device at the end,
    # and a meta tensor cannot be copied to the CPU.
    with _RealAllocations() as allocations, torch.device("meta"):
        model = Transformer(PRESETS[name], Topology.single(device="meta"))
    assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert allocations.bytes < 2**20, f"{allocations.bytes} bytes allocated off the meta device"
    assert sum(p.numel() for p in model.parameters()) == HF_PARAMETER_COUNTS[name]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"weight_tying": True},
        {"num_kv_heads": 1, "head_dim": 32, "vocab_size": 300},  # MQA, wider heads, a padded vocabulary
        {"attention_bias": True, "mlp_bias": True},
        {"norm_type": "layer", "norm_bias": True, "mlp_type": "gelu", "mlp_bias": True},
    ],
    ids=["tiny", "tied", "mqa-wide-heads-padded-vocab", "biases", "layernorm-gelu"],
)
def test_parameter_count_equals_a_real_tiny_build(overrides: dict[str, Any]) -> None:
    arch = preset_architecture("tiny", **overrides)
    model = Transformer(arch, Topology.single())
    assert sum(p.numel() for p in model.parameters()) == parameter_count(arch)


def test_tiny_is_llama_shaped_and_survives_a_hugging_face_round_trip() -> None:
    tiny = PRESETS["tiny"]
    assert (tiny.vocab_size, tiny.hidden_size, tiny.num_layers) == (512, 64, 2)
    assert (tiny.num_attention_heads, tiny.kv_heads, tiny.mlp_size, tiny.sequence_length) == (4, 2, 128, 128)
    assert (tiny.mlp_type, tiny.norm_type, tiny.weight_tying) == ("swiglu", "rms", False)
    # What save_huggingface writes for it reads back as the same preset (pretrained= on an exported tiny model).
    assert architecture_from_hf(hf_config_from_architecture(tiny, torch.float32)) == tiny
    for tp in (1, 2, 4):
        check_against_tensor_parallel(tiny, tp)


def test_tiny_vocabulary_holds_the_byte_level_tokenizer() -> None:
    from scaling.transformer.data.tokenizer import Tokenizer

    assert Tokenizer.byte_level().vocab_size <= PRESETS["tiny"].vocab_size


def test_overrides_return_a_validated_copy() -> None:
    arch = preset_architecture("llama2-7b", sequence_length=2048, attention_kernel="reference")
    assert (arch.sequence_length, arch.attention_kernel, arch.context_length) == (2048, "reference", 4096)
    assert PRESETS["llama2-7b"].sequence_length == 4096  # the registry entry is untouched
    assert arch.model_copy(update={"sequence_length": 4096, "attention_kernel": "torch"}) == PRESETS["llama2-7b"]
    assert preset_architecture("tiny") is PRESETS["tiny"]


def test_bad_override_names_the_field_and_the_preset() -> None:
    with pytest.raises(ConfigError, match=r"preset 'tiny'.*\n.*seqence_length: unknown field.*sequence_length"):
        preset_architecture("tiny", seqence_length=64)
    with pytest.raises(ConfigError, match=r"num_kv_heads.*must be divisible"):
        preset_architecture("tiny", num_kv_heads=3)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown architecture preset 'llama4'.*llama2-7b, .*mistral-7b, tiny"):
        preset_architecture("llama4")


def test_llama_sizes() -> None:
    assert LLAMA_SIZES == {
        "7b": "llama2-7b",
        "13b": "llama2-13b",
        "70b": "llama2-70b",
        "3-8b": "llama3-8b",
        "3-70b": "llama3-70b",
        "tiny": "tiny",
    }
    assert llama_architecture("3-70b") is PRESETS["llama3-70b"]
    assert llama_architecture("7b", sequence_length=512).sequence_length == 512
    with pytest.raises(ValueError, match=r"unknown Llama size '8b'.*'3-8b' \(llama3-8b\)"):
        llama_architecture("8b")
