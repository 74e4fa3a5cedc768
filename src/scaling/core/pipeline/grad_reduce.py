"""Data-parallel gradient averaging in buckets, overlapped with the backward pass.

Gradients are averaged in flat bucket buffers, one collective per bucket. A bucket starts reducing as soon
as every gradient in it is final for the step (a post-accumulate hook counts accumulations: a parameter is
final after one per micro-batch for every model chunk on this rank that uses it), while autograd keeps
computing the gradients of earlier layers. Buckets are launched strictly in index order so every
data-parallel rank issues the same collectives in the same order.

Two modes, by ``reduce_dtype``:

* the parameter's dtype (the default): ``param.grad`` *is* a view into the bucket, reduced in place with
  no copy;
* a wider dtype (fp32 for bf16/fp16 parameters): autograd accumulates into ``param.grad`` as usual, the
  bucket holds an fp32 copy that is reduced, and :meth:`GradReducer.main_grad` returns it. The optimizer
  reads gradients only through ``main_grad``.

With ZeRO the optimizer switches the reduction off (``reduce = False``): the buffers then hold this
rank's local gradient sums, and the optimizer reduce-scatters them straight into its shards, moving half
the bytes of an all-reduce.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["GradReducer"]


class _Bucket:
    def __init__(self, params: list[nn.Parameter], dtype: torch.dtype) -> None:
        self.params = params
        device = params[0].device
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=device)
        self.views: list[torch.Tensor] = []
        offset = 0
        for p in params:
            self.views.append(self.buffer[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        self.in_place = dtype == params[0].dtype  # param.grad lives in the buffer itself
        self.ready = 0
        self.work: Any = None


class GradReducer:
    """Averages the gradients of ``params`` over ``group`` (the data-parallel group).

    Use per step: :meth:`zero` before the first backward, :meth:`finish` after the last one; then read
    :meth:`main_grad`.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        group: dist.ProcessGroup | None,
        size: int,
        bucket_bytes: int,
        reduce_dtype: torch.dtype | None = None,
    ) -> None:
        self.group = group
        self.size = size
        self.reduce = True  # average over data-parallel ranks here; False when the optimizer does it
        trainable = [p for p in params if p.requires_grad]
        self.buckets: list[_Bucket] = []
        self._slot: dict[int, tuple[int, int]] = {}  # id(param) -> (bucket, index in bucket)
        current: list[nn.Parameter] = []
        current_bytes = 0
        # Reverse registration order approximates the order in which backward produces gradients.
        for p in reversed(trainable):
            size_bytes = p.numel() * p.element_size()
            if current and (current_bytes + size_bytes > bucket_bytes or p.dtype != current[0].dtype):
                self._add_bucket(current, reduce_dtype)
                current, current_bytes = [], 0
            current.append(p)
            current_bytes += size_bytes
        if current:
            self._add_bucket(current, reduce_dtype)
        self._expected: dict[int, int] = {}
        self._seen: dict[int, int] = {}
        self._next_launch = 0
        if size > 1:
            for p in trainable:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)  # type: ignore[no-untyped-call]

    def _add_bucket(self, params: list[nn.Parameter], reduce_dtype: torch.dtype | None) -> None:
        for index, p in enumerate(params):
            self._slot[id(p)] = (len(self.buckets), index)
        self.buckets.append(_Bucket(params, reduce_dtype or params[0].dtype))

    def main_grad(self, param: nn.Parameter) -> torch.Tensor:
        """The averaged gradient of ``param`` (in the reduce dtype), valid after :meth:`finish`."""
        bucket, index = self._slot[id(param)]
        return self.buckets[bucket].views[index]

    def zero(self, n_micro: int = 1, uses: dict[int, int] | None = None) -> None:
        """Zero all gradients for a new step.

        A parameter's gradient is final after ``n_micro x uses[id(param)]`` accumulations (default one
        use); ``uses`` counts the model chunks on this rank that contain the parameter.
        """
        uses = uses or {}
        self._expected = {id(p): n_micro * uses.get(id(p), 1) for b in self.buckets for p in b.params}
        self._seen = dict.fromkeys(self._expected, 0)
        for bucket in self.buckets:
            bucket.buffer.zero_()
            bucket.ready = 0
            bucket.work = None
            for p, view in zip(bucket.params, bucket.views, strict=True):
                p.grad = view if bucket.in_place else None
        self._next_launch = 0

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        if not self.reduce:
            return
        key = id(param)
        self._seen[key] = self._seen.get(key, 0) + 1
        if self._seen[key] != self._expected.get(key):
            return
        self.buckets[self._slot[key][0]].ready += 1
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if bucket.ready < len(bucket.params):
                return
            self._launch(bucket)

    @staticmethod
    def _collect(bucket: _Bucket) -> None:
        """Bring every gradient of ``bucket`` into its buffer (a copy in fp32 mode, or if code replaced
        ``.grad``); a parameter that got no gradient contributes zeros."""
        for p, view in zip(bucket.params, bucket.views, strict=True):
            if p.grad is None:
                view.zero_()
                if bucket.in_place:
                    p.grad = view
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
                if bucket.in_place:
                    p.grad = view

    def _launch(self, bucket: _Bucket) -> None:
        self._collect(bucket)
        bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)
        self._next_launch += 1

    def finish(self) -> None:
        """Launch what is left (parameters that got no gradient), wait, and turn the sums into means."""
        if self.size == 1 or not self.reduce:
            for bucket in self.buckets:
                self._collect(bucket)
            return
        while self._next_launch < len(self.buckets):
            self._launch(self.buckets[self._next_launch])
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.buffer.div_(self.size)
