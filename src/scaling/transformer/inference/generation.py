"""Batched generation: left-padded prompts, KV cache, sampling, stop tokens and strings, streaming.

One prefill pass fills the cache with every prompt, then each step feeds one token per sequence. With
``use_cache=False`` every step reruns the whole sequence instead: slower by the sequence length, and
kept as the reference the cached path is tested against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field

from scaling.core.config import BaseConfig
from scaling.transformer.inference.decoder import InferenceModel
from scaling.transformer.inference.sampling import next_tokens

__all__ = ["Completion", "GenerationConfig", "generate", "pad_left"]

TokenCallback = Callable[[int, int], None]  # (row, token)
FinishReason = Literal["length", "stop_token", "stop_string"]


class GenerationConfig(BaseConfig):
    """How to continue prompts."""

    max_new_tokens: int = Field(64, ge=1, description="Tokens to generate at most per prompt.")
    temperature: float = Field(0.0, ge=0, description="0 picks the most likely token (greedy); higher is more random.")
    top_k: int = Field(0, ge=0, description="Sample only among the k most likely tokens; 0 for all.")
    top_p: float = Field(1.0, gt=0, le=1, description="Sample among the most likely tokens holding this mass.")
    repetition_penalty: float = Field(
        1.0, gt=0, description="Above 1, tokens already in the prompt or output become less likely."
    )
    stop_tokens: list[int] = Field(default_factory=list, description="Token ids that end a sequence (kept).")
    stop_strings: list[str] = Field(
        default_factory=list, description="Text that ends a sequence (cut from the text); needs a tokenizer."
    )
    seed: int = Field(0, description="Seed of the sampling generator: the same seed draws the same tokens.")
    use_cache: bool = Field(True, description="Reuse keys and values of earlier tokens (much faster).")


@dataclass
class Completion:
    tokens: list[int]
    text: str | None = None
    finish_reason: FinishReason = "length"
    prompt_tokens: list[int] = field(default_factory=list)


def pad_left(
    sequences: Sequence[Sequence[int]], device: torch.device, pad: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens ``[b, longest]``, valid ``[b, longest]`` and RoPE positions (0 at each first real token)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), longest), pad, dtype=torch.long)
    valid = torch.zeros(len(sequences), longest, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        tokens[row, longest - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
        valid[row, longest - len(seq) :] = True
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    return tokens.to(device), valid.to(device), positions.to(device)


def _check_vocabulary(model: InferenceModel, prompts: Sequence[Sequence[int]]) -> None:
    for row, prompt in enumerate(prompts):
        bad = [t for t in prompt if not 0 <= t < model.vocab_size]
        if bad:
            raise ValueError(
                f"prompt {row}: token ids {bad[:5]} are outside the vocabulary (0..{model.vocab_size - 1})"
            )


@torch.inference_mode()
def generate(
    model: InferenceModel,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    *,
    on_token: TokenCallback | None = None,
) -> list[Completion]:
    """Continue each prompt (token ids); ``on_token(row, token)`` sees every token as it is chosen."""
    config = config or GenerationConfig()
    if config.stop_strings and model.tokenizer is None:
        raise ValueError("stop_strings need a tokenizer: the checkpoint has none")
    _check_vocabulary(model, prompts)
    device = model.device
    batch = len(prompts)
    tokens, valid, positions = pad_left(prompts, device)
    prompt_len = tokens.shape[1]
    generator = torch.Generator(device=device).manual_seed(config.seed)
    seen = torch.zeros(batch, model.vocab_size, dtype=torch.bool, device=device)
    if config.repetition_penalty != 1.0:  # the prompt's real tokens (padding must not mark token 0 as unseen)
        rows = torch.arange(batch, device=device).unsqueeze(1).expand_as(tokens)
        seen[rows[valid], tokens[valid]] = True
    stop_ids = set(config.stop_tokens)

    cache = model.new_cache(batch, prompt_len + config.max_new_tokens) if config.use_cache else None
    logits = model.forward(tokens, positions, valid, cache, 0, last_only=True)[:, -1]  # [b, vocab]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    reasons: list[FinishReason | None] = [None] * batch
    texts: list[str | None] = [None] * batch
    next_positions = positions[:, -1] + 1
    all_tokens, all_valid = tokens, valid
    for step in range(config.max_new_tokens):
        chosen = next_tokens(
            logits, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
            repetition_penalty=config.repetition_penalty, seen=seen, generator=generator,
        )  # fmt: skip
        if config.repetition_penalty != 1.0:
            seen[torch.arange(batch, device=device), chosen] = True
        for row, token in enumerate(chosen.tolist()):  # the step's one host sync: stops and streaming need it
            if reasons[row] is not None:
                continue
            outputs[row].append(token)
            if on_token is not None:
                on_token(row, token)
            if token in stop_ids:
                reasons[row] = "stop_token"
            elif config.stop_strings:
                assert model.tokenizer is not None
                text = model.tokenizer.decode(outputs[row])
                cut = min((text.index(s) for s in config.stop_strings if s in text), default=None)
                if cut is not None:
                    reasons[row], texts[row] = "stop_string", text[:cut]
        if all(r is not None for r in reasons) or step == config.max_new_tokens - 1:
            break
        new = chosen.unsqueeze(1)  # [b, 1]
        all_valid = torch.cat([all_valid, all_valid.new_ones(batch, 1)], dim=1)
        if cache is not None:
            start = prompt_len + step
            logits = model.forward(new, next_positions.unsqueeze(1), all_valid, cache, start, last_only=True)[:, -1]
        else:
            all_tokens = torch.cat([all_tokens, new], dim=1)
            all_positions = torch.cat([positions, positions[:, -1:] + torch.arange(1, step + 2, device=device)], 1)
            logits = model.forward(all_tokens, all_positions, all_valid, last_only=True)[:, -1]
        next_positions = next_positions + 1
    completions = []
    for row in range(batch):
        final = texts[row]
        if final is None and model.tokenizer is not None:
            final = model.tokenizer.decode(outputs[row])
        completions.append(Completion(outputs[row], final, reasons[row] or "length", list(prompts[row])))
    return completions
