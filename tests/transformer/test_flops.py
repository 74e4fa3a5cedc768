"""The FLOPs-per-token formula (``scaling.transformer.flops``): by hand, against 6N, a published model, and
torch's own FLOP counter over a real forward and backward.

A failure of the hand-computed test points at one term of the formula; of the FlopCounterMode test, at
a matmul the formula misses (or counts twice) compared with what the model really runs.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from scaling.core.profiler import TokenFlops
from scaling.transformer import Transformer
from scaling.transformer.flops import FlopsPerToken, flops_per_token, recomputed_layers, token_flops
from scaling.transformer.model.config import TransformerArchitectureConfig

TINY: dict[str, Any] = {
    "vocab_size": 100, "vocab_multiple": 128, "hidden_size": 16, "num_layers": 2, "num_attention_heads": 4,
    "num_kv_heads": 2, "intermediate_size": 32, "sequence_length": 8,
}  # fmt: skip


def test_tiny_architecture_by_hand() -> None:
    f = flops_per_token(TransformerArchitectureConfig.from_dict(TINY))
    # head_dim 16 / 4 = 4; q and output width 4 x 4 = 16; k/v width 2 x 2 kv heads x 4 = 16; padded vocab 128
    q, kv, out = 2 * 16 * 16, 2 * 16 * 16, 2 * 16 * 16  # 512 each
    attention = 2 * 2 * 16 * (8 + 1) / 2  # q k^T and p v over 16 query dims, (s + 1) / 2 = 4.5 keys: 288
    mlp = 3 * 2 * 16 * 32  # gate, up, down: 3072
    assert f.layer_forward == q + kv + out + attention + mlp == 4896
    assert f.head_forward == 2 * 16 * 128 == 4096
    assert f.num_layers == 2
    assert f.model == 3 * (2 * 4896 + 4096) == 41664
    assert f.hardware(0) == f.model
    assert f.hardware(2) == 41664 + 2 * 4896
    gelu = flops_per_token(TransformerArchitectureConfig.from_dict({**TINY, "mlp_type": "gelu"}))
    assert gelu.layer_forward == 4896 - 2 * 16 * 32  # one MLP matmul fewer
    # the sequence length only moves the attention term
    longer = flops_per_token(TransformerArchitectureConfig.from_dict(TINY), sequence_length=16)
    assert longer.layer_forward - f.layer_forward == 2 * 2 * 16 * (17 - 9) / 2


def test_recomputed_layers_follow_the_checkpointing_type() -> None:
    f = FlopsPerToken(layer_forward=10.0, head_forward=5.0, num_layers=4)
    assert recomputed_layers(f, "disabled") == 0
    assert recomputed_layers(f, "every_layer") == 4.5  # 4 layers and the head (half a layer's FLOPs)
    assert recomputed_layers(f, "every_pipe_stage", head=False) == 4
    assert f.hardware(recomputed_layers(f, "every_layer")) == 3 * 45 + 45
    with pytest.raises(ValueError, match="unknown activation_checkpointing_type"):
        recomputed_layers(f, "sometimes")


def _matmul_params(arch: TransformerArchitectureConfig) -> int:
    h, d = arch.hidden_size, arch.dims_per_head
    q, kv = arch.num_attention_heads * d, 2 * arch.kv_heads * d
    layer = h * q + h * kv + q * h + (3 if arch.mlp_type == "swiglu" else 2) * h * arch.mlp_size
    return arch.num_layers * layer + h * arch.padded_vocab_size


@pytest.mark.parametrize("extra", [{}, {"num_kv_heads": 1, "mlp_type": "gelu", "head_dim": 8}])
def test_model_flops_are_six_n_plus_the_causal_attention(extra: dict[str, Any]) -> None:
    arch = TransformerArchitectureConfig.from_dict({**TINY, **extra})
    s, width = arch.sequence_length, arch.num_attention_heads * arch.dims_per_head
    attention = 3 * arch.num_layers * 4 * width * (s + 1) / 2  # fwd + bwd of q k^T and p v, causal
    assert flops_per_token(arch).model == pytest.approx(6 * _matmul_params(arch) + attention, rel=1e-12)


def test_llama2_7b_at_4096_matches_the_published_figure() -> None:
    """Llama-2 7B has 6,738,415,616 parameters (Touvron et al. 2023; the Hugging Face checkpoint). PaLM's
    model-FLOPs formula (Chowdhery et al. 2022, appendix B) is ``6 N + 12 L H Q T`` per token, ``N`` the
    matmul parameters and ``12 L H Q T`` the attention over the full ``T x T`` square; causal attention does
    half of that. ``N`` is the published count less the input embedding (32000 x 4096, a lookup, untied in
    Llama-2): 6,607,343,616 (it still holds the 266,240 norm weights, which our formula leaves out), so the
    published figure is 6 x 6,607,343,616 + 6 x 32 x 32 x 128 x 4096 = 42.866 GFLOPs per token."""
    arch = TransformerArchitectureConfig(
        vocab_size=32000, hidden_size=4096, num_layers=32, num_attention_heads=32, intermediate_size=11008,
        sequence_length=4096,
    )  # fmt: skip
    published = 6 * (6_738_415_616 - 32000 * 4096) + 6 * 32 * 32 * 128 * 4096
    assert published == pytest.approx(42.866e9, rel=1e-4)
    assert flops_per_token(arch).model == pytest.approx(published, rel=0.01)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kernel", ["reference", "torch"])
def test_flop_counter_over_a_real_forward_and_backward_agrees(kernel: str) -> None:
    """torch's FlopCounterMode counts every matmul a real training step runs (cross entropy, norms and
    RoPE are not matmuls, as in the formula), exactly: the tolerance is float rounding only.

    It counts attention as the full ``s x s`` square, where the formula credits the causal half: per token,
    each layer's forward attention is ``4 x width x s`` FLOPs counted against ``4 x width x (s + 1) / 2``
    credited. With the 'reference' kernel (explicit matmuls) backward is 2 x forward, as for every matmul.
    With 'torch' (scaled_dot_product_attention) the counter charges backward 2.5 x forward (it recomputes
    the scores) where it has a formula for the kernel, and 0 for the CPU kernel, which it does not know:
    the attention part is taken from the counter's per-op breakdown and checked on its own.
    """
    torch.manual_seed(0)
    arch = TransformerArchitectureConfig.from_dict({**TINY, "attention_kernel": kernel})
    model = Transformer(arch, seed=3)
    batch_size, s = 2, arch.sequence_length
    tokens = torch.randint(0, arch.vocab_size, (batch_size, s + 1))
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
    with FlopCounterMode(display=False) as counter:
        model(batch).loss.backward()
    tokens_run = batch_size * s
    counted = counter.get_total_flops() / tokens_run
    sdpa = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "scaled_dot_product" in str(op))
    sdpa /= tokens_run

    f = flops_per_token(arch)
    width = arch.num_attention_heads * arch.dims_per_head
    square, causal = 4 * width * s, 4 * width * (s + 1) / 2  # one layer's forward attention per token
    without_attention = f.model - 3 * arch.num_layers * causal  # projections, MLP, head: forward + backward
    if kernel == "reference":
        assert sdpa == 0
        assert counted == pytest.approx(without_attention + 3 * arch.num_layers * square, rel=1e-9)
    else:
        assert counted - sdpa == pytest.approx(without_attention, rel=1e-9)
        assert sdpa in (0, pytest.approx(3.5 * arch.num_layers * square, rel=1e-9)), sdpa


def test_the_plain_model_exposes_its_flops_per_token() -> None:
    from types import SimpleNamespace

    from scaling.transformer.plain.model import ShardedTransformer

    arch = TransformerArchitectureConfig.from_dict(TINY)
    model = SimpleNamespace(architecture=arch)  # the property reads only the architecture: no world to build
    assert ShardedTransformer.flops_per_token.fget(model) == flops_per_token(arch)  # type: ignore[attr-defined]


def test_token_flops_for_the_trainer() -> None:
    arch = TransformerArchitectureConfig.from_dict(TINY)
    f = flops_per_token(arch)
    assert token_flops(arch, "disabled") == TokenFlops(model=f.model, hardware=f.model)
    assert token_flops(arch, "every_layer").hardware == f.model + 2 * f.layer_forward + f.head_forward
