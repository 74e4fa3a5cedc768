"""FLOPs per trained token of the decoder, from its shape alone: the numerator of MFU and HFU.

Counted: every matmul, ``[m, k] x [k, n]`` = ``2 m k n`` FLOPs (one multiply and one add per term).

- per decoder layer and token, forward: the query, key/value and output projections (grouped-query
  aware: the k/v projection is ``2 x kv_heads x head_dim`` wide), the attention scores ``q k^T`` and the
  weighted values ``p v`` (causal: query ``i`` of ``s`` sees ``i + 1`` keys, so the average query sees
  ``(s + 1) / 2``), and the MLP (3 matmuls for SwiGLU, 2 for GELU);
- the LM head, one ``hidden x padded_vocab`` matmul per token; the embedding is a lookup, 0 FLOPs.

Not counted, being a few percent at most and not matmuls: norms, RoPE, softmax, activation functions,
bias adds, residual adds, dropout, the loss. Document masking (packed sequences) would cut the
attention term further; it is not modelled, so such runs are credited the full causal attention.

Training a token costs forward + backward = 3 x forward (backward computes gradients with respect to
both the inputs and the weights: two matmuls per forward matmul). That is the *model* count, the same
for every layout and what MFU divides by. Activation checkpointing runs forwards again in backward:
those FLOPs are real work for the hardware but not progress, so they count only in the *hardware*
count (HFU).
"""

from __future__ import annotations

from dataclasses import dataclass

from scaling.core.profiler.throughput import TokenFlops
from scaling.transformer.model.config import TransformerArchitectureConfig

__all__ = ["FlopsPerToken", "flops_per_token", "recomputed_layers", "token_flops"]


@dataclass(frozen=True)
class FlopsPerToken:
    """Forward FLOPs per token of one decoder layer and of the head; the training counts derive from them."""

    layer_forward: float  # one decoder layer: projections, causal attention, MLP
    head_forward: float  # the LM head matmul (the embedding lookup is 0 FLOPs)
    num_layers: int

    @property
    def forward(self) -> float:
        """One forward pass of the whole model, per token."""
        return self.num_layers * self.layer_forward + self.head_forward

    @property
    def model(self) -> float:
        """Forward + backward per token: 3 x forward. Independent of recomputation and layout."""
        return 3.0 * self.forward

    def hardware(self, recomputed_layers: float) -> float:
        """What the devices execute per token: ``model`` plus ``recomputed_layers`` layer forwards again.

        ``recomputed_layers`` may be fractional (see :func:`recomputed_layers`, which also counts a
        recomputed head in layer-forward units).
        """
        return self.model + recomputed_layers * self.layer_forward


def flops_per_token(arch: TransformerArchitectureConfig, sequence_length: int | None = None) -> FlopsPerToken:
    """The FLOPs per token of ``arch`` trained on samples of ``sequence_length`` (default: the arch's)."""
    s = arch.sequence_length if sequence_length is None else sequence_length
    if s < 1:
        raise ValueError(f"sequence_length must be at least 1, got {s}")
    h, d = arch.hidden_size, arch.dims_per_head
    q_width, kv_width = arch.num_attention_heads * d, 2 * arch.kv_heads * d
    projections = 2.0 * h * q_width + 2.0 * h * kv_width + 2.0 * q_width * h  # q, k/v, output
    keys_seen = (s + 1) / 2  # causal: the average of 1..s
    attention = 2.0 * 2.0 * q_width * keys_seen  # q k^T and p v, every query head
    mlp_matmuls = 3 if arch.mlp_type == "swiglu" else 2
    mlp = mlp_matmuls * 2.0 * h * arch.mlp_size
    head = 2.0 * h * arch.padded_vocab_size
    return FlopsPerToken(layer_forward=projections + attention + mlp, head_forward=head, num_layers=arch.num_layers)


def recomputed_layers(flops: FlopsPerToken, checkpointing: str, *, head: bool = True) -> float:
    """Layer forwards recomputed per token under ``topology.activation_checkpointing_type``.

    ``"disabled"``: 0. ``"every_layer"`` and ``"every_pipe_stage"``: every decoder layer, so
    ``num_layers``; the pipeline engine checkpoints its head layer as well (the embedding is free), which
    ``head`` adds as ``head_forward / layer_forward`` layer-equivalents. A model that recomputes only its
    decoder layers passes ``head=False``.
    """
    value = getattr(checkpointing, "value", checkpointing)  # the enum or its string
    if value == "disabled":
        return 0.0
    if value not in ("every_layer", "every_pipe_stage"):
        raise ValueError(f"unknown activation_checkpointing_type {checkpointing!r}")
    return flops.num_layers + (flops.head_forward / flops.layer_forward if head else 0.0)


def token_flops(
    arch: TransformerArchitectureConfig, checkpointing: str, sequence_length: int | None = None
) -> TokenFlops:
    """The two numbers the trainer reports FLOP/s, MFU and HFU from, for the pipeline engine's recomputation
    under ``checkpointing`` (``topology.activation_checkpointing_type``)."""
    flops = flops_per_token(arch, sequence_length)
    return TokenFlops(model=flops.model, hardware=flops.hardware(recomputed_layers(flops, checkpointing)))
