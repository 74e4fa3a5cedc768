"""RoPE, GQA, attention kernels, document masks and architecture validation."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from scaling.core.config import ConfigError, InvalidCombination
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.transformer.model.attention import Attention, attention_mask, reference_attention
from scaling.transformer.model.config import TransformerArchitectureConfig, check_against_tensor_parallel
from scaling.transformer.model.rope import apply_rotary, inverse_frequencies, rotary_tables


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rope_equals_complex_rotation(fraction: float) -> None:
    b, h, s, d = 2, 3, 5, 8
    rotary = int(d * fraction)
    x = torch.randn(b, h, s, d, dtype=torch.float64)
    positions = torch.arange(s).expand(b, s) + torch.tensor([[0], [7]])
    inv = inverse_frequencies(rotary, 10000.0).double()
    cos, sin = rotary_tables(positions, inv)
    got = apply_rotary(x, cos.double(), sin.double())
    half = rotary // 2
    z = torch.complex(x[..., :half], x[..., half:rotary])  # pairs (i, i + r/2) as complex numbers
    angle = positions.double().unsqueeze(-1) * inv  # [b, s, r/2]
    z = z * torch.polar(torch.ones_like(angle), angle).unsqueeze(1)
    expected = torch.cat([z.real, z.imag, x[..., rotary:]], dim=-1)
    torch.testing.assert_close(got, expected)


def test_llama3_scaling_keeps_high_and_scales_low_frequencies() -> None:
    from scaling.transformer.model.config import RopeScalingConfig

    plain = inverse_frequencies(64, 500000.0)
    scaled = inverse_frequencies(64, 500000.0, RopeScalingConfig(factor=8, original_max_position_embeddings=8192))
    assert torch.equal(scaled[:4], plain[:4])  # short wavelengths untouched
    torch.testing.assert_close(scaled[-1], plain[-1] / 8)  # the longest are slowed by the factor


def _config(**kwargs: Any) -> TransformerArchitectureConfig:
    base = {"vocab_size": 32, "hidden_size": 16, "num_layers": 2, "num_attention_heads": 4, "num_kv_heads": 2}
    return TransformerArchitectureConfig.from_dict({**base, **kwargs})


def _attention_checks() -> int:
    topo = Topology(TopologyConfig())
    torch.manual_seed(0)
    config = _config(attention_kernel="reference")
    attention = Attention(config, topo, seed=3)
    x = torch.randn(2, 6, 16)
    positions = torch.arange(6).expand(2, 6)
    cos, sin = rotary_tables(positions, inverse_frequencies(config.rotary_dims, config.rope_base))
    mask = attention_mask(6, None, x.device)
    # GQA by hand: project, rotate, and give query head h the kv head h // (heads / kv_heads).
    q = (x @ attention.query.weight.t()).view(2, 6, 4, 4).transpose(1, 2)
    kv = (x @ attention.key_value.weight.t()).view(2, 6, 2, 2, 4)
    k, v = kv[..., 0, :].transpose(1, 2), kv[..., 1, :].transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    heads = []
    for head in range(4):
        group = head // 2
        scores = q[:, head] @ k[:, group].transpose(-1, -2) / math.sqrt(4)
        scores = scores.masked_fill(~mask[0, 0], float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, group])
    by_hand = torch.stack(heads, dim=1).transpose(1, 2).reshape(2, 6, 16) @ attention.dense.weight.t()
    reference = attention(x, cos, sin, mask)
    torch.testing.assert_close(reference, by_hand, rtol=1e-5, atol=1e-6)
    sdpa = Attention(config.model_copy(update={"attention_kernel": "torch"}), topo, seed=3)
    torch.testing.assert_close(sdpa(x, cos, sin, mask), reference, rtol=1e-5, atol=1e-6)
    # Packed sequences: with document ids, tokens of the second document ignore the first one.
    docs = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    doc_mask = attention_mask(6, docs, x.device)
    changed = x.clone()
    changed[:, :3] = torch.randn(2, 3, 16)
    first, second = sdpa(x, cos, sin, doc_mask), sdpa(changed, cos, sin, doc_mask)
    torch.testing.assert_close(first[:, 3:], second[:, 3:], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first[:, :3], second[:, :3])
    assert not torch.allclose(sdpa(changed, cos, sin, mask)[:, 3:], second[:, 3:])  # without the mask they mix
    return 0


def test_gqa_kernels_and_document_masks() -> None:
    run_distributed(_attention_checks, 1)


def test_reference_attention_is_causal() -> None:
    q = k = v = torch.randn(1, 1, 4, 2)
    out = reference_attention(q, k, v, attention_mask(4, None, q.device), None)
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0])  # the first token sees only itself


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"num_attention_heads": 6, "num_kv_heads": 4},
         "num_kv_heads: num_attention_heads (6) must be divisible by num_kv_heads (4)"),
        ({"hidden_size": 18}, "hidden_size: hidden_size (18) must be divisible by num_attention_heads (4)"),
        ({"attention_kernel": "triton"}, "attention_kernel: Input should be 'torch', 'flash_attention' or 'reference'"),
        ({"attention_kernel": "flash_attention"}, "needs the flash-attn package"),
        ({"rotary_fraction": 0.3}, "rotary_fraction: rotary_fraction (0.3) x head_dim (4) = 1 rotated dims"),
    ],
)  # fmt: skip
def test_bad_architectures_name_the_field(changes: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config(**changes)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("heads", "kv", "tp", "fragment"),
    [(6, 6, 4, "num_attention_heads (6) must be divisible by the tensor-parallel size (4)"),
     (8, 4, 4, None), (8, 2, 8, None), (12, 3, 4, "num_kv_heads (3) fewer than tensor-parallel ranks (4)"),
     (16, 6, 4, "num_kv_heads (6) must be divisible")],
)  # fmt: skip
def test_kv_heads_against_tensor_parallel(heads: int, kv: int, tp: int, fragment: str | None) -> None:
    if heads % kv:
        return
    config = _config(hidden_size=heads * 4, num_attention_heads=heads, num_kv_heads=kv, intermediate_size=64)
    if fragment is None:
        check_against_tensor_parallel(config, tp)
        return
    with pytest.raises(InvalidCombination, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        check_against_tensor_parallel(config, tp)
