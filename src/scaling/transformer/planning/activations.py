"""Activation bytes of the transformer, counted from what its layers hand autograd to keep.

Each term below is a tensor the forward of :mod:`scaling.transformer.model.layers` saves for backward
(found by listing the saved tensors with ``torch.autograd.graph.saved_tensors_hooks``, and kept honest by
the measured check in ``tests/transformer/test_plan_memory.py``). Per token of one micro-batch on one
tensor-parallel rank, with ``c`` the compute dtype's bytes, ``h`` the hidden size, ``a``/``k`` this rank's
query / key-value heads, ``d`` the head width, ``r`` the rotary dims and ``f`` this rank's MLP width:

* each of the two pre-norms (RMSNorm/LayerNorm computes in fp32): its fp32 input, the normalised value
  and the scaled value (``12h``), the fp32 statistic (4), and in a narrower dtype the cast back that the
  projection reads (``c h``);
* RoPE's cos and sin for queries and keys (``8r``: two fp32 tables, or four in the compute dtype);
* the rotated queries and keys (``c d (a + k)``), the fused k/v projection output that v is a view of
  (``2 c d k_proj``, all kv heads when a rank replicates one), SDPA's output (``c d a``, also the output
  projection's input) and its fp32 log-sum-exp (``4a``);
* SwiGLU: gate, its SiLU, up and their product (``4 c f``); GELU: up, its GELU and the product input
  (``2 c f``);
* per micro-batch and layer, the additive causal mask ``c s^2``.

The head keeps its norm's tensors (as above) and the loss keeps the fp32 logits and softmax of this
rank's vocabulary slice. Attention with the ``reference`` kernel also keeps the ``[a, s, s]`` scores and
probabilities, which flash and SDPA kernels do not.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaling.transformer.model.config import TransformerArchitectureConfig

__all__ = ["LayerActivations", "transformer_activations"]

_FP32 = 4


@dataclass(frozen=True)
class LayerActivations:
    """Bytes one micro-batch leaves alive until its backward, on one tensor-parallel rank.

    ``decoder``: one decoder layer's saved tensors; ``layer_input``: the residual stream a layer receives
    (what activation checkpointing keeps instead); ``head``: the LM head and loss; ``embedding``: the
    embedding's output (its input indices are negligible); ``logits``: the largest transient of the
    backward: the loss's gradient over the vocabulary slice with its softmax and mask temporaries (three
    fp32 copies of the logits, measured)."""

    decoder: int
    layer_input: int
    head: int
    embedding: int
    logits: int


def _norm_bytes(h: int, c: int) -> int:
    return 12 * h + _FP32 + (c * h if c < _FP32 else 0)


def transformer_activations(
    arch: TransformerArchitectureConfig, *, micro_batch_size: int, sequence_length: int, tp: int, compute_bytes: int
) -> LayerActivations:
    """Per-micro-batch activation bytes of each kind of layer on one of ``tp`` ranks (see the module doc)."""
    c, h, s = compute_bytes, arch.hidden_size, sequence_length
    tokens = micro_batch_size * s
    heads = arch.num_attention_heads // tp
    kv_all = arch.kv_heads
    kv_local = max(kv_all // tp, 1)
    kv_projected = kv_all if kv_all < tp else kv_local  # a rank replicating one head projects all of them
    d, r = arch.dims_per_head, arch.rotary_dims
    f = arch.mlp_size // tp
    mlp = 4 * c * f if arch.mlp_type == "swiglu" else 2 * c * f + _FP32 * f
    per_token = (
        2 * _norm_bytes(h, c)
        + 8 * r
        + c * d * (heads + kv_local)
        + 2 * c * d * kv_projected
        + c * d * heads
        + _FP32 * heads
        + mlp
    )
    per_micro = c * s * s
    if arch.attention_kernel == "reference":
        per_micro += 2 * c * micro_batch_size * heads * s * s
    vocab = arch.padded_vocab_size // tp
    return LayerActivations(
        decoder=tokens * per_token + per_micro,
        layer_input=tokens * h * c,
        head=tokens * (_norm_bytes(h, c) + 2 * _FP32 * vocab),
        embedding=tokens * h * c,
        logits=3 * tokens * _FP32 * vocab,
    )
