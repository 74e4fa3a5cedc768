"""Cross entropy over logits split along the vocabulary, without ever gathering the full logits.

With logits ``z`` split over tp ranks and target ``t``::

    loss = log(sum_j exp(z_j - m)) - (z_t - m),   m = max_j z_j

``m``, the sum of exponentials and ``z_t`` (held by exactly one rank) are each one all-reduce of a
``[b, s]`` tensor; the ``[b, s, V]`` logits stay split. The backward is local: ``softmax - onehot(t)``
on this rank's slice of the vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

__all__ = ["vocab_parallel_cross_entropy"]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, target: torch.Tensor, group: dist.ProcessGroup | None, ignore_index: int
    ) -> torch.Tensor:
        distributed = dist.get_world_size(group) > 1
        z = logits.float()
        vocab_local = z.shape[-1]
        start = dist.get_rank(group) * vocab_local if distributed else 0
        z_max = z.max(dim=-1).values
        if distributed:
            dist.all_reduce(z_max, op=dist.ReduceOp.MAX, group=group)
        shifted = z - z_max.unsqueeze(-1)
        valid = target != ignore_index
        local_target = target - start
        owned = valid & (local_target >= 0) & (local_target < vocab_local)
        local_target = local_target.masked_fill(~owned, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1) * owned
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        if distributed:
            both = torch.stack([target_logit, sum_exp])
            dist.all_reduce(both, group=group)
            target_logit, sum_exp = both[0], both[1]
        loss = (sum_exp.log() - target_logit) * valid
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, owned, valid)
        ctx.input_dtype = logits.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        softmax, local_target, owned, valid = ctx.saved_tensors
        grad_logits = softmax  # the saved softmax is this function's own and is used once: overwrite it
        grad_logits.scatter_add_(-1, local_target.unsqueeze(-1), -owned.unsqueeze(-1).to(softmax.dtype))
        grad_logits.mul_((grad * valid).unsqueeze(-1))
        return grad_logits.to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, group: dist.ProcessGroup | None, ignore_index: int = -100
) -> torch.Tensor:
    """Per-token loss ``[...]`` from this rank's logits ``[..., V / tp]`` and targets ``[...]`` (global ids).

    Positions whose target is ``ignore_index`` get loss 0 and zero gradient. Without tensor parallelism
    the vocabulary is whole on this rank and PyTorch's fused kernel computes the same thing faster.
    """
    if group is None or dist.get_world_size(group) == 1:
        flat = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, -2), target.flatten(), ignore_index=ignore_index, reduction="none"
        )
        return flat.view(target.shape)
    loss: torch.Tensor = _VocabParallelCrossEntropy.apply(logits, target, group, ignore_index)  # type: ignore[no-untyped-call]
    return loss
