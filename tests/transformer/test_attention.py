"""RoPE, GQA, attention kernels, document masks, the architecture options (explicit head_dim, partial RoPE,
biases, LayerNorm, GELU MLP, derived MLP width, dropouts) against hand-written formulas, and architecture
validation."""

from __future__ import annotations

import importlib.util
import math
import re
from typing import Any

import pytest
import torch

from scaling.core.config import ConfigError, InvalidCombination
from scaling.core.nn import LayerNorm
from scaling.core.nn.dropout import DropoutKey, dropout_key
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.transformer.model.attention import Attention, attention_mask, reference_attention
from scaling.transformer.model.config import TransformerArchitectureConfig, check_against_tensor_parallel
from scaling.transformer.model.layers import DecoderLayer, GeluMLP
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


def _head_dim_checks() -> int:
    topo = Topology(TopologyConfig())
    torch.manual_seed(0)
    # head_dim 8 with hidden 16 and 4 heads (hidden / heads would be 4); half of each head is rotated.
    config = _config(head_dim=8, rotary_fraction=0.5, attention_bias=True, attention_kernel="reference")
    assert (config.dims_per_head, config.rotary_dims) == (8, 4)
    attention = Attention(config, topo, seed=3)
    shapes = {name: tuple(p.shape) for name, p in attention.named_parameters()}
    assert shapes == {
        "query.weight": (32, 16), "query.bias": (32,),  # 4 heads x 8
        "key_value.weight": (32, 16), "key_value.bias": (32,),  # 2 kv heads x (k, v) x 8
        "dense.weight": (16, 32), "dense.bias": (16,),
    }  # fmt: skip
    with torch.no_grad():
        for p in attention.parameters():
            p.copy_(0.3 * torch.randn_like(p))  # nonzero biases, scores far from uniform
    x = torch.randn(2, 6, 16)
    positions = torch.arange(6).expand(2, 6) + torch.tensor([[0], [3]])
    cos, sin = rotary_tables(positions, inverse_frequencies(config.rotary_dims, config.rope_base))
    mask = attention_mask(6, None, x.device)
    q = (x @ attention.query.weight.t() + attention.query.bias).view(2, 6, 4, 8)  # [b, s, h, d]
    kv = (x @ attention.key_value.weight.t() + attention.key_value.bias).view(2, 6, 2, 2, 8)
    k, v = kv[..., 0, :], kv[..., 1, :]  # [b, s, kv, d]

    def rotate(t: torch.Tensor) -> torch.Tensor:
        """Dims (i, i + 2) for i < 2 turned by position * 10000^(-i/2); dims 4..7 untouched."""
        out = t.clone()
        for i in range(2):
            angle = (positions * 10000.0 ** (-i / 2)).unsqueeze(-1)  # [b, s, 1]
            out[..., i] = t[..., i] * angle.cos() - t[..., i + 2] * angle.sin()
            out[..., i + 2] = t[..., i + 2] * angle.cos() + t[..., i] * angle.sin()
        return out

    q, k = rotate(q), rotate(k)
    heads = []
    for head in range(4):
        scores = q[:, :, head] @ k[:, :, head // 2].transpose(-1, -2) / math.sqrt(8)  # [b, s, s]
        heads.append(scores.masked_fill(~mask[0, 0], float("-inf")).softmax(-1) @ v[:, :, head // 2])
    by_hand = torch.cat(heads, dim=-1) @ attention.dense.weight.t() + attention.dense.bias  # [b, s, hidden]
    got = attention(x, cos, sin, mask)
    torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-5)
    sdpa = Attention(config.model_copy(update={"attention_kernel": "torch"}), topo, seed=3)
    sdpa.load_state_dict(attention.state_dict())
    torch.testing.assert_close(sdpa(x, cos, sin, mask), got, rtol=1e-5, atol=1e-5)
    return 0


def test_explicit_head_dim_partial_rope_and_biases_match_by_hand() -> None:
    run_distributed(_head_dim_checks, 1)


def _norm_mlp_and_decoder_checks() -> int:
    topo = Topology(TopologyConfig())
    torch.manual_seed(0)
    dropouts = {"attention_dropout": 0.1, "attention_output_dropout": 0.1, "mlp_dropout": 0.1}
    config = _config(
        hidden_size=48, norm_type="layer", norm_bias=True, norm_eps=1e-5, mlp_type="gelu", mlp_factor=2.0,
        mlp_bias=True, attention_bias=True, attention_kernel="reference", **dropouts,
    )  # fmt: skip
    assert config.mlp_size == 128  # 2 x 48 = 96, rounded up to a multiple of 64
    layer = DecoderLayer(config, topo, seed=1)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))  # norm weights off one, biases off zero
    x = torch.randn(2, 5, 48)
    # LayerNorm with bias: (x - mean) / sqrt(biased var + eps) * w + b.
    norm = layer.attention_norm
    assert isinstance(norm, LayerNorm) and norm.bias is not None
    centred = x - x.mean(-1, keepdim=True)
    expected = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight + norm.bias
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)
    # GELU MLP: down(gelu(up(x))) with the exact (erf) GELU, and biases on both projections.
    mlp = layer.mlp
    assert isinstance(mlp, GeluMLP)
    shapes = {name: tuple(p.shape) for name, p in mlp.named_parameters()}
    assert shapes == {"up.weight": (128, 48), "up.bias": (128,), "down.weight": (48, 128), "down.bias": (48,)}
    up = x @ mlp.up.weight.t() + mlp.up.bias
    gelu = 0.5 * up * (1 + torch.erf(up / math.sqrt(2)))
    torch.testing.assert_close(mlp(x), gelu @ mlp.down.weight.t() + mlp.down.bias, rtol=1e-5, atol=1e-5)
    # The pre-norm decoder: in eval mode no dropout, h + attention(norm(h)), then + mlp(norm(.)).
    positions = torch.arange(5).expand(2, 5)
    cos, sin = rotary_tables(positions, inverse_frequencies(config.rotary_dims, config.rope_base))
    layer.eval()
    h = x + layer.attention(layer.attention_norm(x), cos, sin, attention_mask(5, None, x.device))
    by_hand = h + layer.mlp(layer.mlp_norm(h))
    torch.testing.assert_close(layer({"h": x, "positions": positions})["h"], by_hand, rtol=1e-5, atol=1e-5)
    # In training the three dropouts change the output, with masks that depend only on the key.
    layer.train()
    with dropout_key(DropoutKey(0, 0, 0, 1)):
        first = layer({"h": x, "positions": positions})["h"]
    with dropout_key(DropoutKey(0, 0, 0, 1)):
        again = layer({"h": x, "positions": positions})["h"]
    with dropout_key(DropoutKey(0, 0, 1, 1)):
        other = layer({"h": x, "positions": positions})["h"]
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, by_hand) and not torch.allclose(first, other)
    return 0


def test_layer_norm_with_bias_gelu_mlp_and_decoder_match_formulas() -> None:
    run_distributed(_norm_mlp_and_decoder_checks, 1)


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
        pytest.param(
            {"attention_kernel": "flash_attention"}, "needs the flash-attn package",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("flash_attn") is not None,
                reason="flash-attn is installed, so the missing-package error cannot happen",
            ),
        ),
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
     (8, 4, 4, None), (8, 2, 8, None), (8, 8, 2, None), (8, 1, 4, None),
     (12, 3, 4, "num_kv_heads (3) fewer than tensor-parallel ranks (4)"),
     (12, 6, 4, "num_kv_heads (6) must be divisible by the tensor-parallel size (4)")],
)  # fmt: skip
def test_kv_heads_against_tensor_parallel(heads: int, kv: int, tp: int, fragment: str | None) -> None:
    config = _config(hidden_size=heads * 4, num_attention_heads=heads, num_kv_heads=kv, intermediate_size=64)
    if fragment is not None:
        with pytest.raises(InvalidCombination, match=re.escape(fragment)):
            check_against_tensor_parallel(config, tp)
        return
    check_against_tensor_parallel(config, tp)
    # Accepted splits: each rank's query heads use kv heads that rank holds (its kv slice, or the one
    # replicated kv head when there are fewer kv heads than ranks).
    group, heads_local = heads // kv, heads // tp
    for rank in range(tp):
        used = {h // group for h in range(rank * heads_local, (rank + 1) * heads_local)}
        held = set(range(rank * kv // tp, (rank + 1) * kv // tp)) if kv >= tp else {rank * heads_local // group}
        assert used <= held and len(held) == max(1, kv // tp), (rank, used, held)


@pytest.mark.parametrize(
    ("changes", "tp", "fragment"),
    [({"vocab_size": 30, "vocab_multiple": 6}, 4, "the padded vocabulary (30) must be divisible by the "
      "tensor-parallel size (4); raise vocab_multiple"),
     ({"intermediate_size": 40}, 16, "the MLP width (40) must be divisible by the tensor-parallel size (16)")],
)  # fmt: skip
def test_vocab_and_mlp_widths_against_tensor_parallel(changes: dict[str, Any], tp: int, fragment: str) -> None:
    config = _config(num_attention_heads=16, num_kv_heads=16, hidden_size=64, **changes)
    with pytest.raises(InvalidCombination, match=re.escape(fragment)):
        check_against_tensor_parallel(config, tp)
