"""Rotary position embeddings (RoPE), with partial rotation and Llama-3 frequency scaling.

Pairs of dimensions ``(x[i], x[i + d/2])`` of the first ``rotary_dims`` dims of each head are rotated by
the angle ``position * inv_freq[i]``, with ``inv_freq[i] = base ** (-2 i / rotary_dims)`` (the "rotate
half" layout of Llama and Hugging Face). The remaining dims pass through unchanged.
"""

from __future__ import annotations

import math

import torch

from scaling.transformer.model.config import RopeScalingConfig

__all__ = ["apply_rotary", "inverse_frequencies", "rotary_tables"]


def inverse_frequencies(rotary_dims: int, base: float, scaling: RopeScalingConfig | None = None) -> torch.Tensor:
    """``[rotary_dims / 2]`` angular frequencies, Llama-3 scaled when ``scaling`` is given."""
    inv = 1.0 / (base ** (torch.arange(0, rotary_dims, 2, dtype=torch.float64) / rotary_dims))
    if scaling is None:
        return inv.float()
    low_wavelength = scaling.original_max_position_embeddings / scaling.high_freq_factor
    high_wavelength = scaling.original_max_position_embeddings / scaling.low_freq_factor
    wavelength = 2 * math.pi / inv
    smooth = (scaling.original_max_position_embeddings / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    scaled = torch.where(wavelength > high_wavelength, inv / scaling.factor, inv)
    between = (wavelength <= high_wavelength) & (wavelength >= low_wavelength)
    blended = (1 - smooth) * inv / scaling.factor + smooth * inv
    return torch.where(between, blended, scaled).float()


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[..., seq, rotary_dims]`` for integer ``positions`` ``[..., seq]``."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)  # [..., s, r/2]
    angles = torch.cat([angles, angles], dim=-1)  # [..., s, r]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of ``x`` ``[b, heads, s, head_dim]``; cos/sin ``[b, s, r]``."""
    rotary = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary], x[..., rotary:]
    first, second = x_rot.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)  # broadcast over heads
    out = x_rot * cos + rotated_half * sin
    return torch.cat([out, x_pass], dim=-1) if x_pass.shape[-1] else out
