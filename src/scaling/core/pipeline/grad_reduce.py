"""Data-parallel gradient averaging in buckets, overlapped with the backward pass.

Each parameter's gradient is a view into a flat bucket buffer, so a bucket is all-reduced in place with
one collective and no copies. A bucket starts reducing as soon as every gradient in it has been
accumulated for the last time in the step (a post-accumulate hook), while autograd keeps computing the
gradients of earlier layers. Buckets are launched strictly in index order so every data-parallel rank
issues the same collectives in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["GradReducer"]


class _Bucket:
    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        dtype, device = params[0].dtype, params[0].device
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=device)
        self.views: list[torch.Tensor] = []
        offset = 0
        for p in params:
            self.views.append(self.buffer[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        self.ready = 0
        self.work: Any = None


class GradReducer:
    """Averages the gradients of ``params`` over ``group`` (the data-parallel group).

    Use per step: :meth:`zero` before the first backward, :meth:`finish` after the last one.
    """

    def __init__(
        self, params: Sequence[nn.Parameter], group: dist.ProcessGroup | None, size: int, bucket_bytes: int
    ) -> None:
        self.group = group
        self.size = size
        trainable = [p for p in params if p.requires_grad]
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, int] = {}
        current: list[nn.Parameter] = []
        current_bytes = 0
        # Reverse registration order approximates the order in which backward produces gradients.
        for p in reversed(trainable):
            if current and (current_bytes + p.numel() * p.element_size() > bucket_bytes or p.dtype != current[0].dtype):
                self._add_bucket(current)
                current, current_bytes = [], 0
            current.append(p)
            current_bytes += p.numel() * p.element_size()
        if current:
            self._add_bucket(current)
        self._expected: dict[int, int] = {}
        self._seen: dict[int, int] = {}
        self._next_launch = 0
        if size > 1:
            for p in trainable:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)  # type: ignore[no-untyped-call]

    def _add_bucket(self, params: list[nn.Parameter]) -> None:
        for p in params:
            self._bucket_of[id(p)] = len(self.buckets)
        self.buckets.append(_Bucket(params))

    def zero(self, n_micro: int = 1, uses: dict[int, int] | None = None) -> None:
        """Zero all gradients and point each ``param.grad`` at its slot in the bucket buffers.

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
                p.grad = view
        self._next_launch = 0

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        key = id(param)
        self._seen[key] = self._seen.get(key, 0) + 1
        if self._seen[key] != self._expected.get(key):
            return
        bucket = self.buckets[self._bucket_of[key]]
        bucket.ready += 1
        self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if bucket.ready < len(bucket.params):
                return
            self._launch(bucket)

    @staticmethod
    def _attach(bucket: _Bucket) -> None:
        """Make sure every gradient of ``bucket`` lives in its buffer (code may have replaced ``.grad``)."""
        for p, view in zip(bucket.params, bucket.views, strict=True):
            if p.grad is None:
                view.zero_()
                p.grad = view
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
                p.grad = view

    def _launch(self, bucket: _Bucket) -> None:
        self._attach(bucket)
        bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)
        self._next_launch += 1

    def finish(self) -> None:
        """Launch what is left (parameters that got no gradient), wait, and turn the sums into means."""
        if self.size == 1:
            for bucket in self.buckets:
                self._attach(bucket)
            return
        while self._next_launch < len(self.buckets):
            self._launch(self.buckets[self._next_launch])
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.buffer.div_(self.size)
