"""Scoring without generating: log-probabilities of given completions, and mean-pooled embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from scaling.transformer.inference.decoder import InferenceModel
from scaling.transformer.inference.generation import pad_left

__all__ = ["ScoredCompletion", "embed", "score"]


@dataclass
class ScoredCompletion:
    token_logprobs: list[float]  # log p(completion token | everything before it), one per completion token
    greedy: bool  # whether every completion token was also the most likely one (exact-match evaluation)

    @property
    def logprob(self) -> float:
        return float(sum(self.token_logprobs))


@torch.inference_mode()
def score(
    model: InferenceModel, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
) -> list[ScoredCompletion]:
    """How likely the model finds each completion after its prompt (one batched forward pass)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if any(len(c) == 0 for c in completions) or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt and every completion needs at least one token")
    sequences = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    tokens, valid, positions = pad_left(sequences, model.device)
    logprobs = model.forward(tokens, positions, valid).log_softmax(dim=-1)  # [b, s, vocab]
    length = tokens.shape[1]
    results = []
    for row, completion in enumerate(completions):
        n = len(completion)
        predicting = logprobs[row, length - n - 1 : length - 1]  # the positions that predict the completion
        targets = tokens[row, length - n :]
        chosen = predicting.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        greedy = bool((predicting.argmax(dim=-1) == targets).all())
        results.append(ScoredCompletion(chosen.tolist(), greedy))
    return results


@torch.inference_mode()
def embed(model: InferenceModel, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """``[b, hidden]``: the final-norm hidden states averaged over each sequence's tokens (float32)."""
    tokens, valid, positions = pad_left(sequences, model.device)
    hidden = model.hidden_states(tokens, positions, valid).float()  # [b, s, hidden]
    weights = valid.float().unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1)
