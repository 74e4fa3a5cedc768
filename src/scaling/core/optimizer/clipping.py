"""The global gradient norm over every rank of the model, and clipping by it.

Each weight must count exactly once: tensor-parallel slices count on every tp rank, replicated
parameters once, tied copies once (see ``ParallelModule.parameters_counted_in_norm``). The squares are
summed locally in fp32 and once over the model-parallel group; data-parallel replicas hold the same
(averaged) gradients and are not summed again.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

__all__ = ["clip_grads_", "global_grad_norm", "grad_norm_by_bucket"]


def global_grad_norm(
    grads: Iterable[torch.Tensor], group: dist.ProcessGroup | None, device: torch.device | None = None
) -> torch.Tensor:
    """L2 norm of the full model's gradient from this rank's counted ``grads`` (each weight once over the
    model-parallel ``group``), identical on every rank of the group; inf/nan propagate."""
    return grad_norm_by_bucket(grads, group, device)[0]


def grad_norm_by_bucket(
    grads: Iterable[torch.Tensor],
    group: dist.ProcessGroup | None,
    device: torch.device | None = None,
    bucket_of: torch.Tensor | None = None,
    n_buckets: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`global_grad_norm`, and the squared norm of each of ``n_buckets`` buckets (``bucket_of[i]``:
    the bucket of ``grads[i]``, e.g. its pipeline layer), summed over ``group`` in the same all-reduce, so
    per-layer norms cost no extra pass over the gradients and no extra collective."""
    grads = list(grads)
    device = grads[0].device if grads else (device or torch.device("cpu"))  # a rank may hold no gradients
    values = torch.zeros(1 + n_buckets, dtype=torch.float32, device=device)  # [total, bucket 0, bucket 1, ...]
    if grads:  # one multi-tensor kernel instead of a pow and a sum per parameter
        squares = torch.stack(torch._foreach_norm([g.detach() for g in grads], 2.0, dtype=torch.float32)).pow(2)
        values[0] = squares.sum()
        if n_buckets and bucket_of is not None:
            values[1:].index_add_(0, bucket_of, squares)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(values, group=group)
    return values[0].sqrt(), values[1:]


def clip_grads_(grads: Iterable[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> torch.Tensor:
    """Scale ``grads`` in place so their global norm is at most ``max_norm``; returns the norm after clipping.

    No host synchronisation: the factor is computed and applied on the device.
    """
    factor = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for grad in grads:
        grad.mul_(factor.to(grad.dtype))
    return total_norm * factor
